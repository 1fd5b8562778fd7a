"""megaslm/deps.py: Hugging Face's hub-kernels distribution (also a top-level ``kernels``) is refused in one line.

CI broke on exactly this: transformers 5.25 started requiring it, the resolver installed it, and 30 tests died
in ``from transformers import LlamaConfig`` with ``cannot import name 'CUDAProperties' from 'kernels'``. The
plant below is the real thing as Python sees it: a ``kernels-<version>.dist-info`` and a ``kernels`` package
on ``sys.path``."""
import os
import subprocess
import sys

import pytest

from megaslm.deps import kernels_name_clash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plant_hub_kernels(where):
    """What ``pip install kernels==0.19.2`` leaves in site-packages, minus the code."""
    info = where / "kernels-0.19.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.2\n")
    (info / "top_level.txt").write_text("kernels\n")
    (where / "kernels").mkdir()
    (where / "kernels" / "__init__.py").write_text("class CUDAProperties: pass\n")
    return where


def test_this_environment_has_no_clash():
    """setup.py's transformers<5.25 keeps the resolver from installing the hub-kernels distribution: an install
    that pulled it in (a loosened pin, a new dependency that needs it) fails here with the one-line reason."""
    assert kernels_name_clash() is None, kernels_name_clash()


def test_planted_distribution_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_plant_hub_kernels(tmp_path)))
    msg = kernels_name_clash()
    assert msg and "'kernels' distribution 0.19.2" in msg and str(tmp_path) in msg and "\n" not in msg
    assert "transformers<5.25" in msg


@pytest.mark.parametrize("cmd", [
    [os.path.join(ROOT, "launchers", "pretrain.py"), "--dry-run"],
    [os.path.join(ROOT, "launchers", "eval.py"), "--help"],
    ["-m", "data_tools", "stats", "no/such/prefix"],
])
def test_entry_points_stop_in_one_line(tmp_path, cmd):
    planted = _plant_hub_kernels(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(planted), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: the Hugging Face 'kernels' distribution 0.19.2"), r.stderr
    assert "Traceback" not in r.stderr


def test_hf_export_refuses(tmp_path, monkeypatch):
    from megaslm.interop.errors import InteropError
    from megaslm.interop.hf import save_hf

    monkeypatch.syspath_prepend(str(_plant_hub_kernels(tmp_path / "site")))
    with pytest.raises(InteropError, match="shares the top-level import name 'kernels'"):
        save_hf({}, None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
