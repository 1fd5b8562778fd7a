"""Rank functions for the evals tests (run inside tests/distributed.py:run_ranks groups)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch


def train_tiny(out_dir: str, steps: int, interval: int) -> str:
    """Train the tiny config on a small demo corpus; checkpoints every ``interval`` steps."""
    from megaslm.config_io import load_config
    from megaslm.run import run

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml"),
                      [f"output_dir={out_dir}", "data.demo_stories=200", f"schedule.stages.0.train_steps={steps}",
                       f"checkpoint.interval={interval}", "checkpoint.keep_last=5", "logging.interval=1000"])
    from tests.workers import with_demo_corpus

    run(with_demo_corpus(cfg), log=lambda *_: None)
    from megaslm import parallel

    parallel.destroy()
    return out_dir


def _reference_logprobs(chunk, cfg, seqs) -> List[List[float]]:
    """Independent single-process computation: full logits (TP=1), float64 log-softmax, pick targets."""
    out = []
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            pos = torch.arange(len(s)).unsqueeze(0)
            logits = chunk(x, pos, attention_mask=torch.zeros_like(x, dtype=torch.int32))  # [1, s, V]
            lp = torch.log_softmax(logits[0].double(), dim=-1)
            out.append([float(lp[t, s[t + 1]]) for t in range(len(s) - 1)])
    return out


def layouts(ckpt: str, bench: str, layout_overrides: Sequence[Sequence[str]], tp2pp2_dir: str) -> Dict:
    """Score one checkpoint under each layout; plus reference, random-init and a TP2xPP2 save/read check."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.checkpoint import Checkpoint
    from evals.benchmarks import encode, load_benchmark
    from evals.engine import build_eval_model, eval_config, load_checkpoint_model
    from evals.generate import sample
    from evals.runner import evaluate

    bm = load_benchmark(bench)
    out: Dict = {"layouts": []}
    prompt = next(it for it in bm.items if it.benchmark == "sSC" and it.languages == ("fr", "fr")).context
    for ov in layout_overrides:
        cfg, chunks = load_checkpoint_model(ckpt, list(ov))
        res = evaluate(chunks, cfg, [bm], "mean", False, 8)
        res_sum = evaluate(chunks, cfg, [bm], "sum_continuation", False, 8)
        greedy = sample(chunks, cfg, prompt, 12, temperature=0.0)
        sampled = sample(chunks, cfg, prompt, 12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
        rec = {"overrides": list(ov), "tp": ps.get_tensor_model_parallel_world_size(),
               "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
               "per_item": res["per_item"], "tasks": res["tasks"], "tasks_sum": res_sum["tasks"],
               "per_item_sum": res_sum["per_item"], "alignment": res["alignment"],
               "greedy": greedy, "sampled": sampled}
        if ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1:
            items = [it for it in bm.items if it.benchmark != "align"][:24]
            seqs = [encode(cfg.vocab, it.context, c, False)[0] for it in items for c in it.candidates]
            rec["reference"] = _reference_logprobs(chunks[0], cfg, seqs)
            rec["reference_ids"] = [(it.id, k) for it in items for k in range(len(it.candidates))]
            ps.destroy_model_parallel()
            rnd = build_eval_model(cfg, None)                   # untrained: layout-independent random init
            r0 = evaluate(rnd, cfg, [bm], "mean", False, 8)
            rec["random_tasks"] = r0["tasks"]
        if ps.get_tensor_model_parallel_world_size() == 2 and ps.get_pipeline_model_parallel_world_size() == 2:
            from evals.hooks import evaluate_chunks

            cfg.eval.benchmarks = [bench]
            cfg.output_dir = tp2pp2_dir
            rec["hook"] = evaluate_chunks(chunks, cfg, 5)
        ps.destroy_model_parallel()
        out["layouts"].append(rec)

    # a checkpoint SAVED at TP=2 x PP=2 reads back to the weights the trainer held
    from megaslm.config_io import load_config
    from megaslm.sharding import gather_full_state_dict
    from megaslm.train import Trainer
    from tests.workers import fixed_batch, rank_slice

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml"),
                      ["parallel.tensor=2", "parallel.pipeline=2", f"output_dir={tp2pp2_dir}",
                       "schedule.stages.0.train_steps=2", "logging.interval=1000"])
    tr = Trainer(cfg, log=lambda *_: None)
    batch = fixed_batch(cfg)
    tr.train_step(rank_slice(batch, tr.dp_rank, tr.dp_size))
    tr.step = 1
    if dist.get_rank() == 0:
        cfg.save(os.path.join(tp2pp2_dir, "config.yaml"))   # megaslm.run.run writes it; Trainer alone does not
    path = tr.save()
    held = gather_full_state_dict(tr.chunks, cfg)
    dist.barrier()
    if dist.get_rank() == 0:
        full = Checkpoint(path).state_dict()
        out["tp2pp2_keys_equal"] = sorted(full) == sorted(held)
        out["tp2pp2_max_diff"] = max(float((full[k] - held[k]).abs().max()) for k in held)
    ps.destroy_model_parallel()
    del tr
    parallel.destroy()
    return out
