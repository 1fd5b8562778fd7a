"""Executor plumbing that needs no cluster: the multi-node hostfile, the launch commands, the run lock,
what a job reads, data builds by any command (and the data-only mode), and running vs stopped runs."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, sweep, tiny_spec

from megaslm.checkpoint.layout import tag_for
from megaslm.sweeps.execute import execute_run, hostfile_from_job, train_command
from megaslm.sweeps.expand import expand
from megaslm.sweeps.spec import SweepError
from megaslm.sweeps.state import LOCK, load_job, run_state, write_configs


def test_hostfile_from_the_allocation(tmp_path, monkeypatch):
    # what a task of a SLURM job sees (submitit's job environment parses the nodelist: no scontrol)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-03],big7")
    path = hostfile_from_job(str(tmp_path / "hostfile"), gpus_per_node=8)
    assert open(path).read() == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\nbig7 slots=8\n"


def test_no_allocation_no_hostfile(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert hostfile_from_job(str(tmp_path / "hostfile"), 8) is None     # not in a job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert hostfile_from_job(str(tmp_path / "hostfile"), 8) is None     # submitit's LocalExecutor: no allocation


def test_train_commands():
    one = train_command("c.yaml", "py", gpus=0, nodes=1, hostfile=None)
    assert one[0] == "py" and one[1].endswith(os.path.join("launchers", "pretrain.py")) and one[-2:] == ["--config", "c.yaml"]
    node = train_command("c.yaml", "py", gpus=4, nodes=1, hostfile=None)
    assert node[:5] == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "4"]
    multi = train_command("c.yaml", "py", gpus=8, nodes=2, hostfile="/x/hostfile")
    assert multi[3:7] == ["--hostfile", "/x/hostfile", "--num_gpus", "8"] and "--no_local_rank" in multi
    assert train_command("c.yaml", "py", gpus=2, nodes=1, hostfile=None, port=1234)[5:7] == ["--master_port", "1234"]


def test_a_run_held_by_another_process_is_refused(tmp_path):
    import fcntl

    sw = expand(tiny_spec(tmp_path))
    write_configs(sw)
    run = sw.runs[0]
    os.makedirs(run.dir, exist_ok=True)
    # another process (think: a trainer whose sweep driver was killed) holds the run's lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({os.path.join(run.dir, '.sweep.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepError, match="another process is running it"):
            execute_run(os.path.join(sw.dir, "sweep.json"), run.name, lock_wait=1.0)
        assert not os.path.exists(os.path.join(run.dir, "logs", "train.log"))   # nothing started
    finally:
        holder.kill()
        holder.wait()
    lock = open(os.path.join(run.dir, ".sweep.lock"), "a")   # released with its holder
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _hold(lock_path):
    """Another process holding a lock (think: a trainer whose sweep driver was killed)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({lock_path!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _status_line(spec, name):
    r = sweep("status", "--spec", spec)
    assert r.returncode == 0, r.stderr
    return next(l for l in r.stdout.splitlines() if l.startswith(name + " ")).split(), r.stdout


def test_status_tells_a_running_run_from_a_stopped_one(tmp_path):
    """running: its lock is held by a live process, at the step it logged last (metrics.jsonl); stopped:
    nobody holds it (interrupted), at its newest checkpoint's step."""
    spec = tiny_spec(tmp_path)
    sw = expand(spec)
    write_configs(sw)
    run = sw.runs[0]
    ckpt = os.path.join(run.dir, "checkpoints", tag_for(3))
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump({"step": 3, "tokens_seen": 768, "stage_tokens": {}}, f)
    with open(os.path.join(run.dir, "metrics.jsonl"), "w") as f:
        for s in (5, 7):
            f.write(json.dumps({"step": s, "loss": 4.0, "tokens_seen": 256 * s}) + "\n")
        f.write('{"step": 8, "lo')   # the last line torn by a kill
    holder = _hold(os.path.join(run.dir, LOCK))
    try:
        st = run_state(run)
        assert (st["state"], st["step"], st["tokens_seen"]) == ("running", 7, 1792), st
        assert run_state(run, live=False)["state"] == "stopped"   # what the lock's own holder asks
        cells, out = _status_line(spec, run.name)
        assert cells[1:4] == ["running", f"7/{run.config.total_steps()}", f"1,792/{run.tokens:,}"], out
        assert "3 pending, 1 running (running: its lock held by a live process" in out
    finally:
        holder.kill()
        holder.wait()
    st = run_state(run)
    assert (st["state"], st["step"], st["tokens_seen"]) == ("stopped", 3, 768), st
    cells, out = _status_line(spec, run.name)
    assert cells[1:4] == ["stopped", f"3/{run.config.total_steps()}", f"768/{run.tokens:,}"], out
    assert "3 pending, 1 stopped" in out


def test_a_job_reads_the_resolved_config_not_the_spec(tmp_path):
    """A job trains <sweep>/configs/<run>.yaml as the driver wrote it, with the datasets and benchmarks
    of sweep.json: the spec is not read again (here it is gone, and the resolved config edited)."""
    spec = tiny_spec(tmp_path)
    sw = expand(spec)
    write_configs(sw)
    run = sw.runs[-1]
    os.remove(spec)
    cfg_path = os.path.join(sw.dir, "configs", f"{run.name}.yaml")
    tree = yaml.safe_load(open(cfg_path))
    tree["optimizer"]["lr"] = 0.0123
    with open(cfg_path, "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
    job = load_job(os.path.join(sw.dir, "sweep.json"), run.name)
    assert job.config_path == cfg_path and job.run.config.optimizer.lr == 0.0123
    assert job.run.config.to_dict() == {**run.config.to_dict(), "optimizer": {**run.config.to_dict()["optimizer"],
                                                                               "lr": 0.0123}}
    assert (job.run.name, job.run.tokens, job.run.stage_tokens) == (run.name, run.tokens, run.stage_tokens)
    assert job.run.datasets == run.datasets and {k: job.datasets[k] for k in run.datasets} == \
        {k: sw.datasets[k] for k in run.datasets}
    assert job.benchmarks == sw.benchmarks and job.eval_overrides == sw.spec.eval_overrides
    with pytest.raises(SweepError, match="not in .*sweep.json any more"):
        load_job(os.path.join(sw.dir, "sweep.json"), "gone.s1")


CONVERT = """import os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "items.jsonl"), "w") as f:
    f.write('{"id": 1}\\n')
with open(os.path.join(os.path.dirname(out), "convert-calls.txt"), "a") as f:
    f.write(out + "\\n")
"""


def test_data_mode_builds_with_a_users_own_command(tmp_path):
    """A benchmark converted by the user's own script is a dataset like the others: its build is that
    command (argv, or a shell string), run once under the lock with a marker; `data` builds without training."""
    (tmp_path / "convert.py").write_text(CONVERT)
    base = yaml.safe_load(open(tiny_spec(tmp_path)))["datasets"]
    spec = tiny_spec(tmp_path, benchmarks=["bench", "mybench"], datasets={
        **base,
        "mybench": {"kind": "files", "prefix": "{data}/mybench", "build": ["{python}", "convert.py", "{data}/mybench"]},
        "shell": {"kind": "files", "prefix": "{data}/sh", "build": "mkdir -p {data}/sh && echo ok > {data}/sh/x"},
        "broken": {"kind": "files", "prefix": "{data}/broken",
                   "build": ["{python}", "-c", "import sys; sys.exit('error: no input at /nowhere')"]}})
    sw = expand(spec)
    assert all("mybench" in r.datasets for r in sw.runs)   # a step of every run, built before it trains
    calls = os.path.join(sw.data_dir, "convert-calls.txt")
    r = sweep("data", "--spec", spec, "--dataset", "mybench", "--dataset", "shell")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"mybench: {sw.data_dir}/mybench (built)" in r.stdout and f"shell: {sw.data_dir}/sh (built)" in r.stdout
    assert open(calls).read() == os.path.join(sw.data_dir, "mybench") + "\n"
    assert open(os.path.join(sw.data_dir, "sh", "x")).read() == "ok\n"
    assert sorted(os.listdir(os.path.join(sw.data_dir, ".built"))) == ["mybench.done", "mybench.lock", "shell.done",
                                                                        "shell.lock"]
    assert not os.path.exists(os.path.join(sw.dir, "runs"))   # nothing trained
    r = sweep("data", "--spec", spec, "--dataset", "mybench")   # built once: the marker makes it a no-op
    assert r.returncode == 0 and "mybench: " in r.stdout and "(already there)" in r.stdout, r.stdout + r.stderr
    assert open(calls).read().count("\n") == 1
    r = sweep("data", "--spec", spec, "--dataset", "broken")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: data build broken failed (exit 1; log ") and \
        r.stderr.strip().endswith("error: no input at /nowhere"), r.stderr
    assert not os.path.exists(os.path.join(sw.data_dir, ".built", "broken.done"))
    r = sweep("data", "--spec", spec, "--dataset", "nope")
    assert r.returncode == 1 and "'nope' is not a dataset of this spec" in r.stderr, r.stderr
