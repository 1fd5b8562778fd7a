"""Helpers shared by the training tests (a unique module name: conftest.py names collide across dirs)."""
import os

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
