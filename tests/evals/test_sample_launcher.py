"""launchers/sample.py: a prompt continued from a checkpoint; seeded; bad prompts give one line and exit 2."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _py(args, **kw):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_sample_from_checkpoint(trained):
    run = trained["run"]   # the evals tests' tiny run (tests/evals/conftest.py), trained once per session
    args = ["launchers/sample.py", "--checkpoint", str(run), "--prompt", "5,17,17,42", "--max-new", "12",
            "--top-k", "20", "--seed", "3"]
    outs = []
    for _ in range(2):
        r = _py(args)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]  # seeded
    cont = outs[0]["continuation"]
    assert outs[0]["prompt"] == [5, 17, 17, 42] and 1 <= len(cont) <= 12
    assert all(0 <= u < 128 for u in cont)  # units, not token ids
    bad = _py(["launchers/sample.py", "--checkpoint", str(run), "--prompt", "5 999"])
    assert bad.returncode == 2 and "unit 999 outside the codebook [0, 128)" in bad.stderr and "Traceback" not in bad.stderr
