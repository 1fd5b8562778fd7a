"""Periodic evaluation during training, through the same code as launchers/eval.py.

The trainer calls ``evaluate_chunks(self.chunks, cfg, step)`` every ``cfg.eval.interval`` steps (on
every rank: it is collective); the chunks are the training chunks at the training layout.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from megaslm.checkpoint.layout import tag_for
from megaslm.config import RunConfig

from evals.benchmarks import load_benchmark
from evals.runner import evaluate

_CACHE: Dict[tuple, object] = {}


def evaluate_chunks(chunks: List[torch.nn.Module], cfg: RunConfig, step: int) -> Dict:
    """Score ``cfg.eval.benchmarks`` with already-built chunks; returns a flat dict of metrics
    (``eval/<task>`` accuracies, ``eval/<align task>/cosine`` ...) and appends the full result to
    ``<output_dir>/evals/results.jsonl`` (rank 0). Restores the chunks' train mode."""
    import torch.distributed as dist

    e = cfg.eval
    benches = []
    for p in e.benchmarks:
        key = (p, e.max_items)
        if key not in _CACHE:
            _CACHE[key] = load_benchmark(p, e.max_items)
        benches.append(_CACHE[key])
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        res = evaluate(chunks, cfg, benches, e.scoring, e.add_bos, e.batch_size)
    finally:
        for c, m in zip(chunks, modes):
            c.train(m)
    flat = {f"eval/{k}": v["accuracy"] for k, v in res["tasks"].items()}
    for k, v in res["alignment"].items():
        flat[f"eval/{k}/cosine"] = v["cosine"]
        flat[f"eval/{k}/retrieval"] = v["retrieval"]
    if not dist.is_initialized() or dist.get_rank() == 0:
        d = os.path.join(cfg.output_dir, "evals")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "results.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in res.items() if k != "per_item"}}) + "\n")
        with open(os.path.join(d, f"{tag_for(step)}.items.jsonl"), "w") as f:
            for rec in res["per_item"]:
                f.write(json.dumps(rec) + "\n")
    return flat
