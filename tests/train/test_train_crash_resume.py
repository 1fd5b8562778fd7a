"""The launcher as a subprocess: kill -9 at a random step, kill -9 inside a checkpoint save, SIGTERM
pre-emption; each resumed run must end with the weights of an uninterrupted run and exact budgets."""
import json
import os
import random
import signal
import subprocess
import sys

import torch

from _train_helpers import ROOT, assert_same_weights, finish, launch_env, tiny_config, wait_for_step

BUDGETS = {"en": 868, "mix": 24 * 256}
TOTAL_STEPS = 4 + 24


def launch(cfg, out, env_extra=None, extra=()):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--config", cfg,
                             f"output_dir={out}", *extra], env=launch_env(env_extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_state(out):
    ck = os.path.join(out, "checkpoints")
    tag = open(os.path.join(ck, "latest")).read().strip()
    assert tag == f"step{TOTAL_STEPS:08d}"
    model = torch.load(os.path.join(ck, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    with open(os.path.join(ck, tag, "meta.json")) as f:
        return model["module"], json.load(f)


def test_kill_and_resume(tmp_path, corpus):
    stages = [
        {"name": "en", "train_tokens": 868, "data": [{"path": corpus["en"], "weight": 1.0}]},
        {"name": "mix", "train_steps": 24, "data": [{"path": corpus["enfr_interleaved"], "weight": 0.5},
                                                    {"path": corpus["fr"], "weight": 0.5}]},
    ]
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=stages,
                      checkpoint={"interval": 3, "keep_last": 2}, logging={"interval": 100})

    ref = tmp_path / "ref"
    rc, log = finish(launch(cfg, ref))
    assert rc == 0, log[-3000:]
    ref_w, ref_meta = final_state(ref)
    assert ref_meta["stage_tokens"] == BUDGETS == ref_meta["stage_budgets"]

    # 1. SIGKILL at a random step, then resume
    killed = tmp_path / "killed"
    p = launch(cfg, killed)
    k = random.randint(4, 14)
    wait_for_step(p, killed, k)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    rc, log = finish(launch(cfg, killed))
    assert rc == 0 and "resumed from" in log, log[-3000:]
    w, meta = final_state(killed)
    assert_same_weights(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS and meta["source_tokens"] == ref_meta["source_tokens"]

    # 2. SIGKILL inside the save of step 6 (after the tmp dir is written, before the rename)
    crashed = tmp_path / "crashed"
    rc, log = finish(launch(cfg, crashed, {"MEGASLM_FAULT": "kill_during_save:6"}))
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
    p = launch(cfg, pre)
    wait_for_step(p, pre, 5)
    p.send_signal(signal.SIGTERM)
    rc, log = finish(p)
    assert rc == 0 and "pre-empted (SIGTERM)" in log, log[-3000:]
    stopped = int((pre / "checkpoints" / "latest").read_text()[4:])
    assert 5 <= stopped < TOTAL_STEPS
    rc, log = finish(launch(cfg, pre))
    assert rc == 0, log[-3000:]
    w, meta = final_state(pre)
    assert_same_weights(w, ref_w)
    assert meta["stage_tokens"] == BUDGETS
