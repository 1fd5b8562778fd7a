"""Two ranks (PP=2) under the real deepspeed launcher: kill -9 the whole job at a random step, kill
rank 0 inside a checkpoint save, and kill -TERM the deepspeed runner alone; each resumed job ends with
the weights of an uninterrupted one (every pipeline stage's file, bit-identical) and exactly the stage
budgets."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from _train_helpers import ROOT, assert_same_weights, finish, launch_env, tiny_config, wait_for_step
from tests.distributed import free_port

BUDGETS = {"en": 868, "mix": 12 * 256}
TOTAL_STEPS = 4 + 12
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


FAULT_LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_launch.py")


def launch(cfg, out, env_extra=None, script=os.path.join(ROOT, "launchers", "pretrain.py"), extra=()):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
           script, *extra, "--config", cfg, f"output_dir={out}"]
    return subprocess.Popen(cmd, env=launch_env(env_extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def final_state(out):
    ck = os.path.join(out, "checkpoints")
    tag = open(os.path.join(ck, "latest")).read().strip()
    assert tag == f"step{TOTAL_STEPS:08d}"
    stages = [torch.load(os.path.join(ck, tag, f"mp_rank_{r:02d}_model_states.pt"), map_location="cpu",
                         weights_only=True)["module"] for r in range(2)]
    return stages, json.load(open(os.path.join(ck, tag, "meta.json")))


def assert_same(a, b):
    for sa, sb in zip(a, b):  # one state dict per pipeline stage
        assert_same_weights(sa, sb)


def test_two_rank_kill_and_resume(tmp_path, corpus):
    stages = [
        {"name": "en", "train_tokens": 868, "data": [{"path": corpus["en"], "weight": 1.0}]},
        {"name": "mix", "train_steps": 12, "data": [{"path": corpus["enfr_interleaved"], "weight": 0.5},
                                                    {"path": corpus["fr"], "weight": 0.5}]},
    ]
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=stages,
                      parallel={"pipeline": 2}, checkpoint={"interval": 3, "keep_last": 2},
                      logging={"interval": 100})
    ref = tmp_path / "ref"
    rc, log = finish(launch(cfg, ref))
    assert rc == 0, log[-3000:]
    ref_w, ref_meta = final_state(ref)
    assert ref_meta["stage_tokens"] == BUDGETS

    # kill -9 every process of the job (launcher and both ranks) at a random step, then resume
    killed = tmp_path / "killed"
    p = launch(cfg, killed)
    k = random.randint(4, 11)
    wait_for_step(p, killed, k)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    rc, log = finish(launch(cfg, killed))
    assert rc == 0 and "resumed from" in log, log[-3000:]
    w, meta = final_state(killed)
    assert_same(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS and meta["source_tokens"] == ref_meta["source_tokens"]

    # rank 0 killed inside the save of step 6: the job dies, `latest` still names step 3, resume is exact
    crashed = tmp_path / "crashed"
    rc, log = finish(launch(cfg, crashed, script=FAULT_LAUNCH, extra=["--kill-during-save", "6"]))
    assert rc != 0
    assert (crashed / "checkpoints" / "latest").read_text() == "step00000003"
    rc, log = finish(launch(cfg, crashed))
    assert rc == 0 and "resumed from" in log, log[-3000:]
    w, meta = final_state(crashed)
    assert_same(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS

    # the deepspeed runner killed alone (kill -TERM of its pid; its per-node launcher and the ranks are not
    # told): the ranks notice within a second, agree on a step, save and exit instead of training on as
    # orphans; the resumed job ends bit-identical
    orphan = tmp_path / "orphan"
    p = launch(cfg, orphan)
    wait_for_step(p, orphan, 5)
    os.kill(p.pid, signal.SIGTERM)
    log, _ = p.communicate(timeout=120)   # EOF once the per-node launcher and both ranks have closed the pipe
    assert f"pre-empted (the launcher, pid {p.pid}" in log and "checkpoint saved at step" in log, log[-3000:]
    t0 = time.time()
    while _alive(p.pid):                  # nothing of the job is left running
        assert time.time() - t0 < 30, "processes of the job outlived its launcher"
        time.sleep(0.2)
    stopped = int((orphan / "checkpoints" / "latest").read_text()[4:])
    assert 5 <= stopped < TOTAL_STEPS
    rc, log = finish(launch(cfg, orphan))
    assert rc == 0 and "resumed from" in log, log[-3000:]
    w, meta = final_state(orphan)
    assert_same(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS


def _alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
