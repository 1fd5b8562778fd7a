"""The compile check again, with the oldest Triton that setup.py admits (3.6: the release in the lent H100/H200
image, beside its torch 2.11), so that both ends of the supported range are compiled in CI, not only the
venv's newest one. Triton 3.6 compiled differently from 3.9 before (the binder's compilation knobs differ), and
its register allocation differs (spills per kernel: docs/bench/compile_all-triton-3.6.0.md). With this release the
check compiles one variant per code path (``--representative``: kernel, arch, dtypes, flags, masked sizes; the
largest tiles), the full check staying on the venv's Triton (test_compile_all.py): the old release must accept
every path of our kernels' source; that every tile size of a path compiles is what the full check shows.

That Triton lives beside the venv's own, without its dependencies, in .venv/triton-3.6 (or the folder
MEGASLM_OLD_TRITON names); the test installs it there on its first run (pip, ~190 MB), into a temporary folder
renamed into place, so an interrupted install is never taken for a finished one.
"""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels_compile.test_compile_all import ROOT, _env

OLD_TRITON = "3.6.0"


def _old_triton_dir() -> Path:
    return Path(os.environ.get("MEGASLM_OLD_TRITON", ROOT / ".venv" / "triton-3.6"))


def _install_old_triton(where: Path) -> None:
    if (where / "triton" / "__init__.py").is_file():
        return
    tmp = where.with_name(f"{where.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        f"triton=={OLD_TRITON}"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"cannot install triton=={OLD_TRITON} into {tmp}: {r.stderr[-2000:]}"
    os.replace(tmp, where)


@pytest.mark.slow
def test_every_variant_compiles_with_the_oldest_supported_triton(tmp_path):
    where = _old_triton_dir()
    _install_old_triton(where)
    env = _env(f"{where}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[0] == OLD_TRITON, r.stdout + r.stderr
    assert r.stdout.split()[1].startswith(str(where)), r.stdout
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--representative", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rows = list(csv.DictReader(open(tmp_path / f"compile_all-triton-{OLD_TRITON}.csv")))
    assert rows and all(row["status"] == "ok" for row in rows)
    header = (tmp_path / f"compile_all-triton-{OLD_TRITON}.md").read_text().splitlines()
    assert f"triton {OLD_TRITON}," in header[2] and "representative:" in header[2], header[:3]
    # the same launched variants as with the venv's Triton: nothing was dropped by this release's binder
    assert {(row["kernel"], row["arch"]) for row in rows} >= {(k, a) for k in ("_attn_fwd_kernel",
                                                                          "_attn_bwd_dkdv_kernel",
                                                                          "_attn_bwd_dq_kernel")
                                                             for a in ("sm_80", "sm_90")}
