"""Helpers shared by the training tests (a unique module name: conftest.py names collide across dirs)."""
import json
import os
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(path, output_dir, prefixes, stages=None, **sections):
    """A very small run config (2 layers, width 32, seq 32, 8 sequences/step = 256 tokens/step)."""
    cfg = {
        "name": "t", "output_dir": str(output_dir), "seed": 7, "precision": "fp32",
        "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": 32, "attention_backend": "reference",
                  "embedding_backend": "reference"},
        "vocab": {"codebook_size": 128, "languages": ["en", "fr"]},
        "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 1},
        "data": {"seed": 11},
        "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
        "schedule": {"micro_batch_size": 2, "global_batch_size": 8, "warmup_fraction": 0.1, "stages": stages or [
            # 3 full steps + a partial one of 100 tokens; then a blended stage of 4 steps
            {"name": "en", "train_tokens": 3 * 256 + 100, "data": [{"path": prefixes["en"], "weight": 1.0}]},
            {"name": "mix", "train_steps": 4, "data": [{"path": prefixes["enfr_interleaved"], "weight": 0.5},
                                                        {"path": prefixes["fr"], "weight": 0.5}]},
        ]},
        "checkpoint": {"interval": 2, "keep_last": 2},
        "logging": {"interval": 1},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


# ---- launcher subprocesses (the crash/resume tests) -------------------------------------------
LAUNCH_ENV_DROP = ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "TRITON_INTERPRET")


def launch_env(extra=None):
    """This process's environment without the rank variables a spawned launcher must set itself."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_DROP}
    env.update(extra or {})
    return env


def finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def last_step(out):
    """The newest step in ``<out>/metrics.jsonl`` (0 before the first)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(p, out, step, timeout=240):
    t0 = time.time()
    while last_step(out) < step:
        assert p.poll() is None, f"run ended before step {step}: {p.communicate()[0][-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def assert_same_weights(a, b):
    """Two model state dicts hold bit-identical floating-point tensors."""
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
