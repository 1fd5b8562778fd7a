"""Evaluate model chunks or checkpoints on benchmark folders; the library behind launchers/eval.py.

    cfg, chunks = load_checkpoint_model(ckpt, ["parallel.tensor=2"])    # any layout
    result = evaluate(chunks, cfg, [load_benchmark("bench/")], scoring="mean")

``evaluate`` is collective (every rank calls it); every rank returns the same result.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megaslm import parallel
from megaslm.checkpoint.layout import checkpoint_step
from megaslm.config import RunConfig
from megaslm.fsutil import atomic_write_text
from megaslm.progress import Progress

from evals.alignment import align_items
from evals.benchmarks import ALIGN, Benchmark, check_vocab, load_benchmark
from evals.engine import load_checkpoint_model
from evals.errors import EvalError
from evals.preflight import preflight, prepare_benchmarks
from evals.scoring import accuracies, score_items


def evaluate(chunks: List[torch.nn.Module], cfg: RunConfig, benches: Sequence[Benchmark], scoring: str = "mean",
             add_bos: bool = False, batch_size: int = 16) -> Dict:
    """``{"tasks": {task: {accuracy, items}}, "alignment": {task: metrics}, "per_item": [...]}``."""
    for b in benches:
        check_vocab(b.vocab, cfg.vocab, b.path)
    pair, align = [], {}
    for b in benches:
        for task, items in b.tasks().items():
            if items[0].benchmark == ALIGN:
                align.setdefault(task, []).extend(items)
            else:
                pair.extend(items)
    per_item = score_items(chunks, cfg, pair, scoring, add_bos, batch_size) if pair else []
    alignment = {t: align_items(chunks, cfg, its, add_bos, batch_size) for t, its in sorted(align.items())}
    return {"scoring": scoring, "add_bos": add_bos, "tasks": accuracies(per_item), "alignment": alignment,
            "per_item": per_item}


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def evaluate_checkpoint(ckpt: str, bench_paths: Sequence[str], overrides: Sequence[str] = (),
                        out_dir: Optional[str] = None,
                        prepared: Optional[Tuple[List[str], List[Benchmark]]] = None) -> Dict:
    """Load ``ckpt`` at the eval layout (``overrides``), score the benchmarks, write per-item scores
    to ``out_dir/<tag>.items.jsonl`` (rank 0). Tears the process groups down afterwards.

    The benchmarks are loaded and checked against the vocabulary the checkpoint records before its model
    is built (``evals.preflight``; ``prepared``: that already done, by ``evaluate_path``)."""
    prepared = prepared or prepare_benchmarks(ckpt, bench_paths, overrides)
    cfg, chunks = load_checkpoint_model(ckpt, overrides)
    try:
        e = cfg.eval
        if prepared is not None:
            paths, benches = prepared
        else:     # a checkpoint whose config only its torch files hold: checked once loaded
            paths = list(bench_paths) or list(e.benchmarks)
            if not paths:
                raise EvalError("no benchmarks given (pass --benchmarks or set eval.benchmarks)")
            benches = [load_benchmark(p, e.max_items) for p in paths]
        res = evaluate(chunks, cfg, benches, e.scoring, e.add_bos, e.batch_size)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    tag = os.path.basename(os.path.normpath(ckpt))
    res.update(checkpoint=os.path.abspath(ckpt), tag=tag, step=checkpoint_step(ckpt),
               layout={"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline,
                       "data": cfg.data_parallel_size(None)}, benchmarks=[os.path.abspath(p) for p in paths])
    if out_dir and _is_writer():
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{tag}.items.jsonl")
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in res["per_item"]))
        res["per_item_file"] = path
    return res


def evaluate_path(path: str, bench_paths: Sequence[str], overrides: Sequence[str] = (),
                  out_dir: Optional[str] = None, log=print, checked=None) -> List[Dict]:
    """Every checkpoint of ``path`` (one checkpoint, a run directory or its checkpoints/ folder), in step order.

    Writes results.json, results.md and evals.png (with the run's evaluations during training) to ``out_dir``
    (rank 0). ``checked``: ``evals.preflight.
    preflight(path, bench_paths, overrides)`` already run (by the launcher, before torch was imported).
    """
    from evals.report import read_training_results, training_results_path, write_reports

    # every checkpoint's eval config and benchmarks checked before the first model is built
    checked = checked if checked is not None else preflight(path, bench_paths, overrides)
    results = []
    # the checkpoints' progress (total, ETA) on rank 0: RANK, the process groups are not up yet
    for c, prep in Progress("eval", total=len(checked), unit="checkpoints",
                            enabled=os.environ.get("RANK", "0") == "0").iterate(checked):
        r = evaluate_checkpoint(c, bench_paths, overrides, out_dir, prep)
        if _is_writer():
            log(f"{r['tag']}: " + ", ".join(f"{k} {v['accuracy'] * 100:.2f}" for k, v in sorted(r["tasks"].items()))
                + "".join(f", {k} cos {v['cosine']:.3f}" for k, v in r["alignment"].items()))
        results.append({k: v for k, v in r.items() if k != "per_item"})
    if out_dir and _is_writer():
        training = read_training_results(training_results_path(checked[0][0])) if checked else []
        write_reports(results, out_dir, training)
    parallel.destroy()
    return results
