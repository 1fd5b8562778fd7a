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
    # a benchmark of the training-time evaluation is checked before anything runs, not at the first evaluation
    (["eval.interval=2", "eval.benchmarks=[TMP/b.jsonl]"], {}, "manifest.json: field 'vocab' missing"),
])
def test_bad_config_one_line(tmp_path, args, env, expected):
    (tmp_path / "b.jsonl").write_text("\n")
    (tmp_path / "manifest.json").write_text("{}")
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    r = _run(args + [f"output_dir={tmp_path}/run"], env)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expected in err[0], r.stderr
    assert "Traceback" not in r.stderr
    # stopped before anything ran: no process group, no run directory
    assert not (tmp_path / "run").exists()
    assert "init_process_group" not in r.stderr and "deepspeed" not in r.stdout.lower()


def test_taken_rendezvous_port_is_one_line_naming_it(tmp_path):
    """Another process holds MASTER_PORT: the error names the port and how to choose another."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run([f"output_dir={tmp_path}/run", "schedule.stages.0.train_steps=1", "data.demo_stories=40"],
                 {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"rendezvous port {port}" in err[0] and "--master_port" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_lone_process_takes_a_free_port_not_29500(tmp_path):
    """Without a launcher (no WORLD_SIZE / MASTER_PORT), a run does not need 29500 to be free."""
    import socket

    try:
        s = socket.socket()
        s.bind(("127.0.0.1", 29500))
        s.listen()
    except OSError:
        s = None  # someone else holds it already: the point stands either way
    try:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"),
                            f"output_dir={tmp_path}/run", "schedule.stages.0.train_steps=1", "data.demo_stories=40",
                            "checkpoint.save=false"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items()
                                if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT", "LOCAL_RANK")})
    finally:
        if s is not None:
            s.close()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Transformer Engine and Apex" not in r.stderr and "path_to_cache is None" not in r.stderr + r.stdout


def _fake_checkpoint(tmp_path):
    """A run directory with one checkpoint whose meta.json records a valid config, and garbage weights (never
    read by a test that passes)."""
    import json

    from megaslm.checkpoint.layout import tag_for
    from megaslm.config_io import load_config

    tag = tmp_path / "run" / "checkpoints" / tag_for(10)
    tag.mkdir(parents=True)
    (tag / "model.safetensors").write_bytes(b"not a safetensors file")
    (tag / "meta.json").write_text(json.dumps({"step": 10, "config": load_config(None, ["data.demo=true"]).to_dict()}))
    return str(tmp_path / "run")


PRETRAIN, EVAL, SWEEP = (os.path.join("launchers", f) for f in ("pretrain.py", "eval.py", "sweep.py"))


@pytest.mark.parametrize("cmd,expected", [
    ([PRETRAIN, "model.bogus=1"], "error: " + os.path.join(ROOT, "configs", "tiny.yaml") + ": model.bogus: unknown key"),
    ([PRETRAIN, "parallel.tensor=3"], "error: parallel.tensor: expected a divisor of model.num_attention_heads=4"),
    ([PRETRAIN, "schedule.stages.0.train_steps=null", "schedule.stages.0.train_tokens=100"],
     "error: schedule.stages[0].train_tokens: expected at least one step (2,048 tokens = schedule.global_batch_size "
     "x model.seq_length = 16 x 128), got 100"),
    ([PRETRAIN, "--dry-run", "model.bogus=1"], "error: " + os.path.join(ROOT, "configs", "tiny.yaml") + ": model.bogus"),
    ([PRETRAIN, "--bogus"], "error: pretrain.py: unrecognized arguments: --bogus (see pretrain.py --help)"),
    ([EVAL, "--checkpoint", "RUN", "model.bogus=1"], "error: eval config: model.bogus: unknown key"),
    ([EVAL, "--checkpoint", "RUN", "eval.scoring=best"], "error: eval config: eval.scoring: expected mean, "),
    ([EVAL, "--checkpoint", "RUN", "parallel.tensor=2"], "error: eval layout: world size 1 is not a multiple of "),
    ([EVAL, "--checkpoint", "TMP/none"], "error: TMP/none: checkpoint or run directory not found"),
    ([SWEEP, "plan", "bogus.x=1"], "error: " + os.path.join(ROOT, "configs", "sweeps", "demo.yaml") + ": bogus: unknown"),
    ([SWEEP, "plan", "--bogus"], "error: launchers/sweep.py: unrecognized arguments: --bogus"),
    (["-m", "data_tools", "build", "-i", "x.jsonl", "-o", "TMP/o", "--bogus"],
     "error: python -m data_tools: unrecognized arguments: --bogus (see python -m data_tools --help)"),
    (["-m", "data_tools", "build", "-i", "x.jsonl", "-o", "TMP/o", "--p", "half"],
     "error: python -m data_tools build: argument --p: invalid float value: 'half' (see python -m data_tools build --help)"),
    (["-m", "data_tools", "budget"], "error: python -m data_tools budget: the following arguments are required: "),
])
def test_config_and_argument_errors_come_before_torch(tmp_path, cmd, expected):
    """Issue 25 item 7: a bad override or flag is refused by every launcher and by data_tools in one line, exit 2,
    before torch is imported (seconds: the config and its rules are torch-free, the CUDA ones come after).
    ``-X importtime`` lists every module the process imported; the check is on that list, not on a time."""
    run = _fake_checkpoint(tmp_path) if "RUN" in cmd else ""
    cmd = [a.replace("RUN", run).replace("TMP", str(tmp_path)) for a in cmd]
    expected = expected.replace("TMP", str(tmp_path))
    r = subprocess.run([sys.executable, "-X", "importtime", *cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    imported = {l.rsplit("|", 1)[-1].strip() for l in r.stderr.splitlines() if l.startswith("import time:")}
    said = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("import time:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(said) == 1 and said[0].startswith(expected), said
    assert not {m for m in imported if m.split(".")[0] in ("torch", "megatron", "deepspeed")}, said
    assert r.stdout == ""
    assert not (tmp_path / "o.bin").exists()
