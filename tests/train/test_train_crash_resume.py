"""The launcher as a subprocess: two uninterrupted runs are bit-identical; five kill -9 trials at random
moments (some inside checkpoint saves) of one run, a kill -9 at a fixed point inside a save, SIGTERM
pre-emption, a second run on a directory in use refused; each resumed run must end with the weights
of an uninterrupted run, exact budgets and a metrics.jsonl that holds every step once."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch

from _train_helpers import ROOT, assert_same_weights, finish, launch_env, tiny_config, wait_for_step

BUDGETS = {"en": 868, "mix": 24 * 256}
TOTAL_STEPS = 4 + 24


FAULT_LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_launch.py")


def launch(cfg, out, env_extra=None, extra=(), script=os.path.join(ROOT, "launchers", "pretrain.py")):
    return subprocess.Popen([sys.executable, script, "--config", cfg,
                             f"output_dir={out}", *extra], env=launch_env(env_extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_state(out):
    ck = os.path.join(out, "checkpoints")
    tag = open(os.path.join(ck, "latest")).read().strip()
    assert tag == f"step{TOTAL_STEPS:08d}"
    model = torch.load(os.path.join(ck, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    with open(os.path.join(ck, tag, "meta.json")) as f:
        return model["module"], json.load(f)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def watch(p):
    """Collect the run's output lines as they come (a reader thread)."""
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
    return lines


def wait_until(p, cond, what, timeout=240):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, f"run ended before {what}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.002)


def kill_trial(cfg, out, where, rng):
    """Start the run; kill -9 it at a random step after its resume point ("step"), or the moment a
    save of a new step has begun, i.e. its tmp directory exists ("save")."""
    ck = out / "checkpoints"
    p = launch(cfg, out)
    lines = watch(p)
    steps = lambda: [int(l.split("|")[0].split()[1]) for l in list(lines) if l.startswith("step ")]  # noqa: E731
    # the first step this run trains (leftovers of an earlier kill are removed before it)
    wait_until(p, lambda: steps(), "the first step")
    first = steps()[0]
    if where == "step":
        # a random step past the next save (interval 3): every "step" trial leaves a newer complete
        # checkpoint, so the trials make progress and the last run must resume
        k = first + 3 + rng.randint(0, 2)
        wait_until(p, lambda: k in steps(), f"step {k}")
    else:
        wait_until(p, lambda: ck.is_dir() and any(d.startswith("step") and d.endswith(".tmp")
                                                  and int(d[4:12]) >= first for d in os.listdir(ck)), "a save")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, f"{where}: the run ended before the kill"


def test_kill_and_resume(tmp_path, corpus):
    stages = [
        {"name": "en", "train_tokens": 868, "data": [{"path": corpus["en"], "weight": 1.0}]},
        {"name": "mix", "train_steps": 24, "data": [{"path": corpus["enfr_interleaved"], "weight": 0.5},
                                                    {"path": corpus["fr"], "weight": 0.5}]},
    ]
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=stages,
                      checkpoint={"interval": 3, "keep_last": 2}, logging={"interval": 1})

    ref = tmp_path / "ref"
    rc, log = finish(launch(cfg, ref))
    assert rc == 0, log[-3000:]
    ref_w, ref_meta = final_state(ref)
    assert ref_meta["stage_tokens"] == BUDGETS == ref_meta["stage_budgets"]

    # 0. a second uninterrupted run of the same config is bit-identical (losses and weights), although
    #    this one runs beside busy processes (the first on a quieter machine). configs/tiny.yaml run idle and
    #    beside busy processes differed from step 2 at parallel.cpu_threads=2; the default (1) must not
    ref2 = tmp_path / "ref2"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        rc, log = finish(launch(cfg, ref2))
    finally:
        for b in busy:
            b.kill()
            b.wait()
    assert rc == 0, log[-3000:]
    w2, _ = final_state(ref2)
    assert_same_weights(w2, ref_w)
    assert [r["loss"] for r in metrics(ref2)] == [r["loss"] for r in metrics(ref)]

    # 1. five kill -9 trials at random moments of one run: at a random step, or the moment a save
    #    has begun (its tmp directory exists); then the last resume finishes the run
    rng = random.Random()
    killed = tmp_path / "killed"
    ck = killed / "checkpoints"
    inside_save = 0
    for where in ["step", "save", "step", "save", "save"]:
        kill_trial(cfg, killed, where, rng)
        # (a kill before the first save leaves no checkpoints directory yet)
        inside_save += ck.is_dir() and any(d.endswith(".tmp") for d in os.listdir(ck))
    assert inside_save >= 1  # at least one kill landed inside a save (a tmp directory was left)
    rc, log = finish(launch(cfg, killed))
    assert rc == 0 and "resumed from" in log, log[:2500] + " ... " + log[-1500:]
    w, meta = final_state(killed)
    assert_same_weights(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS and meta["source_tokens"] == ref_meta["source_tokens"]
    steps = [r["step"] for r in metrics(killed)]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # each step once, re-run steps not repeated
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(ref)]

    # 2. SIGKILL inside the save of step 6 (after the tmp dir is written, before the rename)
    crashed = tmp_path / "crashed"
    rc, log = finish(launch(cfg, crashed, script=FAULT_LAUNCH, extra=["--kill-during-save", "6"]))
    assert rc == -signal.SIGKILL, log[-3000:]
    ck = crashed / "checkpoints"
    assert (ck / "step00000006.tmp").is_dir() and (ck / "latest").read_text() == "step00000003"
    rc, log = finish(launch(cfg, crashed))
    assert rc == 0 and "step 3" in log and "resumed from" in log, log[-3000:]
    assert not (ck / "step00000006.tmp").exists()
    w, meta = final_state(crashed)
    assert_same_weights(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS
    assert len([d for d in os.listdir(ck) if d.startswith("step")]) == 2  # keep_last

    # 3. SIGTERM: save at the end of the current step, exit 0; the next run finishes the job
    pre = tmp_path / "preempted"
    release = tmp_path / "release"
    p = launch(cfg, pre, script=FAULT_LAUNCH, extra=["--hold-in-step", "6", str(release)])
    wait_for_step(p, pre, 5)
    # the run is held inside step 6: a second run on the same directory is refused in one line naming the
    # holder; the first is untouched
    rc, log = finish(launch(cfg, pre))
    assert rc == 2 and f"another run is using it, pid {p.pid} on host" in log, log[-3000:]
    assert len([line for line in log.splitlines() if line.startswith("error:")]) == 1
    assert not any(".corrupt-" in d for d in os.listdir(pre / "checkpoints"))
    p.send_signal(signal.SIGTERM)
    release.write_text("")
    rc, log = finish(p)
    assert rc == 0 and "pre-empted (SIGTERM)" in log, log[-3000:]
    stopped = int((pre / "checkpoints" / "latest").read_text()[4:])
    assert 5 <= stopped < TOTAL_STEPS
    rc, log = finish(launch(cfg, pre))
    assert rc == 0, log[-3000:]
    w, meta = final_state(pre)
    assert_same_weights(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS
