"""launchers/pretrain.py: bad configs stop with one line naming the field, before any process group."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, cwd=ROOT):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), *args],
                          cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,env,expected", [
    (["model.no_such_key=1"], {}, "model.no_such_key: unknown key"),
    (["parallel.tensor=3"], {}, "parallel.tensor: expected a divisor of model.num_attention_heads=4, got 3"),
    (["parallel.tensor=2"], {"WORLD_SIZE": "3", "RANK": "0"}, "parallel: expected world size 3 = tensor(2) x pipeline(1) x data"),
    (["--config", "no/such/file.yaml"], {}, "no/such/file.yaml: config file not found"),
    (["data.demo=false", "schedule.stages.0.data=[{path: no/such/data, weight: 1.0}]"], {},
     "dataset no/such/data: no/such/data.bin not found"),
])
def test_bad_config_one_line(tmp_path, args, env, expected):
    r = _run(args + [f"output_dir={tmp_path}/run"], env)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expected in err[0], r.stderr
    assert "Traceback" not in r.stderr
    # stopped before anything ran: no process group, no run directory
    assert not (tmp_path / "run").exists()
    assert "init_process_group" not in r.stderr and "deepspeed" not in r.stdout.lower()
