"""A finished DP=2 ZeRO-2 run under the deepspeed launcher exits 0 with nothing printed about a C++
terminate (the engine is released, every rank meets at a barrier, then the groups are destroyed in order);
its index cache lives under the run directory and no 'path_to_cache is None' warning is printed."""
import os
import subprocess
import sys

from _train_helpers import ROOT, launch_env, tiny_config
from tests.distributed import free_port

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def test_dp2_zero2_run_exits_0(tmp_path, corpus):
    stages = [{"name": "mix", "train_steps": 3, "data": [{"path": corpus["enfr_interleaved"], "weight": 0.5},
                                                          {"path": corpus["fr"], "weight": 0.5}]}]
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=stages,
                      parallel={"zero_stage": 2}, checkpoint={"interval": 0})
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        r = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
                            os.path.join(ROOT, "launchers", "pretrain.py"), "--config", cfg, f"output_dir={out}"],
                           env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-3000:]
        assert "terminate called" not in log and "exits with return code" not in log, log[-3000:]
        assert "path_to_cache is None" not in log and "Transformer Engine and Apex" not in log
        assert os.path.exists(out / "cache" / "data_index" / "COMPLETE")
        assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
