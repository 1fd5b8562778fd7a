"""A tiny sweep end to end: local executor (2 sizes x 2 recipes, killed mid-way and re-run), submitit's
LocalExecutor and a real single-node SLURM where slurm-wlm + munge are installed (1 size x 2 recipes)."""
import csv
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import BUDGET, PY, ROOT, SWEEP, sweep, tiny_spec

from megaslm.checkpoint.layout import newest_meta
from megaslm.sweeps.expand import expand
from megaslm.sweeps.state import run_state


def _train_log(run):
    p = os.path.join(run.dir, "logs", "train.log")
    return open(p).read() if os.path.exists(p) else ""


# One size x two recipes for the submitit and SLURM executors: they run the same driver code as the local
# one (all four runs, killed mid-way); two runs through the scheduler keep CI time down.
ONE_SIZE = [{"name": "xs", "num_layers": 1, "hidden_size": 32}]


def check_finished_sweep(spec_path, n_runs=4):
    sw = expand(spec_path)
    assert len(sw.runs) == n_runs
    for r in sw.runs:
        st = run_state(r)
        assert st["state"] == "evaluated", (r.name, st)
        meta = newest_meta(r.dir)
        # exactly the matched budget, per stage as the recipe splits it
        assert meta["tokens_seen"] == BUDGET, (r.name, meta["tokens_seen"])
        assert meta["stage_tokens"] == {s.name: s.train_tokens for s in r.config.schedule.stages}
        assert sum(meta["stage_tokens"].values()) == BUDGET
        res = json.load(open(os.path.join(r.dir, "evals", "results.json")))["checkpoints"][-1]
        assert res["scoring"] == "mean_continuation"
        assert {"sTC EN→FR", "sTC-EN", "sSC FR→EN"} <= set(res["tasks"]) and "align EN-FR" in res["alignment"]
    rep = os.path.join(sw.dir, "report")
    rows = list(csv.DictReader(open(os.path.join(rep, "results.csv"))))
    assert sorted(r["run"] for r in rows) == sorted(r.name for r in sw.runs)
    assert all(int(r["tokens_trained"]) == BUDGET for r in rows)
    # the held-out loss of the spec's valid data, logged by every run and used as "final loss"
    assert all(r["loss_kind"] == "validation" and 0 < float(r["final_loss"]) < 6 for r in rows), rows
    md = open(os.path.join(rep, "results.md")).read()
    table = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| arm")]
    assert len(table) == n_runs          # one seed: one row per arm = one row per run
    assert f"exactly {BUDGET} tokens" in md and "scoring: mean_continuation" in md
    assert "Final loss: held-out validation loss" in md
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "accuracy_vs_flops.png"):
        p = os.path.join(rep, "plots", png)
        assert os.path.getsize(p) > 1000
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    return sw


def test_local_sweep_killed_midway_resumes_without_retraining(tmp_path):
    spec = tiny_spec(tmp_path)
    sw = expand(spec)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(os.path.join(str(tmp_path), "first.log"), "w")
    proc = subprocess.Popen([PY, SWEEP, "run", "--spec", spec], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT, start_new_session=True)
    # kill the whole sweep (driver, trainer, evaluator) as soon as one run is evaluated and another is
    # running with a checkpoint saved: a SIGKILL leaves no chance to clean up
    deadline = time.time() + 900
    states = {}
    try:
        while time.time() < deadline:
            states = {r.name: run_state(r) for r in sw.runs}
            kinds = [s["state"] for s in states.values()]
            running = [r for r in sw.runs if states[r.name]["state"] == "running"]
            if "evaluated" in kinds and running and states[running[0].name]["checkpoint"]:
                break
            if proc.poll() is not None:
                break
            with open(log.name) as f:
                assert " failed (exit" not in f.read(), open(log.name).read()[-3000:]
            time.sleep(0.3)
        assert proc.poll() is None, "the sweep ended before it could be killed mid-way"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = [r for r in sw.runs if states[r.name]["state"] == "evaluated"]
    partial = [r for r in sw.runs if states[r.name]["state"] == "running"]
    assert finished and partial, states
    # killed, the run that was running is stopped at its newest checkpoint (its lock went with the processes)
    for _ in range(50):
        after = {r.name: run_state(r) for r in partial}
        if all(s["state"] == "stopped" for s in after.values()):
            break
        time.sleep(0.1)
    assert all(s["state"] == "stopped" and s["step"] > 0 for s in after.values()), after
    st = sweep("status", "--spec", spec)
    assert st.returncode == 0 and " stopped " in st.stdout and " running " not in st.stdout, st.stdout
    before = {r.name: (_train_log(r), os.path.getmtime(os.path.join(newest_meta(r.dir)["_path"], "meta.json")))
              for r in finished}
    partial_step = {r.name: run_state(r)["step"] for r in partial}

    r = sweep("run", "--spec", spec)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "already finished and evaluated (skipped): " in r.stdout
    for run in finished:    # never trained again: no new training command, same checkpoint
        assert _train_log(run) == before[run.name][0]
        assert os.path.getmtime(os.path.join(newest_meta(run.dir)["_path"], "meta.json")) == before[run.name][1]
    for run in partial:     # resumed from its own checkpoint, through the trainer's resume
        assert f"resumed from" in _train_log(run), run.name
        assert partial_step[run.name] > 0
    check_finished_sweep(spec)

    # a third call has nothing to do
    r = sweep("run", "--spec", spec)
    assert r.returncode == 0 and "0 run(s) processed" in r.stdout, r.stdout[-2000:]
    st = sweep("status", "--spec", spec)
    assert st.returncode == 0 and "4 evaluated" in st.stdout
    # the data were built once and shared: one marker per built dataset (bench is made by world's build)
    built = sorted(os.listdir(os.path.join(sw.data_dir, ".built")))
    assert [b for b in built if b.endswith(".done")] == ["en.done", "fr.done", "interleaved_p0.5.done", "valid.done",
                                                         "world.done"]
    logs = os.listdir(os.path.join(sw.data_dir, "logs"))
    for name in ("world", "en", "fr", "interleaved_p0.5", "valid"):   # each build command ran exactly once
        assert open(os.path.join(sw.data_dir, "logs", f"{name}.log")).read().count("$ ") == 1, logs


def test_submitit_local_executor(tmp_path):
    spec = tiny_spec(tmp_path, executor={"kind": "submitit-local", "time_min": 30}, sizes=ONE_SIZE)
    r = sweep("run", "--spec", spec)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("submitted as job") == 2
    check_finished_sweep(spec, n_runs=2)


def test_real_slurm(tmp_path):
    from slurm_cluster import Unavailable, start

    try:
        env, stop = start(tmp_path)
    except Unavailable as e:
        pytest.skip(f"no real SLURM here: {e}")
    try:
        spec = tiny_spec(tmp_path, executor={"kind": "slurm", "time_min": 30, "cpus_per_task": 1, "array": True},
                         sizes=ONE_SIZE)
        env = dict(env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([PY, SWEEP, "run", "--spec", spec], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout.count("submitted as job") == 2
        check_finished_sweep(spec, n_runs=2)
    finally:
        stop()
