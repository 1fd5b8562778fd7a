"""Run inside spawned ranks (tests/distributed.py run_ranks) by test_language_embedding.py."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch


def _load(path, overrides=()):
    from megaslm.config_io import load_config

    return load_config(path, list(overrides))


def _tensor(ckpt_dir: str, tag: str, key: str) -> torch.Tensor:
    sd = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                    weights_only=False)["module"]
    return sd[key].clone()


def _dataset_alignment(config_path: str, base_dir: str) -> Dict:
    """Samples of the language-carrying dataset vs megatron's plain GPTDataset over the same stage."""
    from megaslm.data import build_stage_dataset

    cfg_on = _load(config_path, [f"output_dir={base_dir}/ds_on"])
    cfg_off = _load(config_path, [f"output_dir={base_dir}/ds_off", "model.language_embedding=false"])
    out = {}
    for i, stage in enumerate(cfg_on.schedule.stages):
        n = 24
        on = build_stage_dataset(cfg_on, stage, n, seed_offset=i)
        off = build_stage_dataset(cfg_off, cfg_off.schedule.stages[i], n, seed_offset=i)
        samples = []
        for j in range(n):
            a, b = on[j], off[j]
            samples.append({"tokens": a["tokens"].tolist(), "lang_ids": a["lang_ids"].tolist(),
                            "plain_tokens": b["tokens"].tolist(), "plain_labels": b["labels"].tolist(),
                            "labels": a["labels"].tolist(),
                            "dataset_id": int(a["dataset_id"]) if "dataset_id" in a else 0})
        out[stage.name] = samples
    return out


def single(config_path: str, base_dir: str) -> Dict:
    """One rank: train with the language table (uninterrupted vs stopped-and-resumed), the dataset
    alignment, the evals' use of the table, and the TP=1 reference losses for the TP=2 case."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.sharding import LANG
    from megaslm.run import run

    res: Dict = {}
    full = os.path.join(base_dir, "full")
    # with a held-out loss (its forward feeds language ids too)
    v = [f"eval.valid=[{_load(config_path).schedule.stages[0].data[0].path}]", "eval.valid_interval=2",
         "eval.valid_sequences=8"]
    h_full = run(_load(config_path, [f"output_dir={full}"] + v), log=lambda *_: None)
    part = os.path.join(base_dir, "part")
    h1 = run(_load(config_path, [f"output_dir={part}", "checkpoint.interval=0"] + v), log=lambda *_: None,
             max_steps=3)
    h2 = run(_load(config_path, [f"output_dir={part}"] + v), log=lambda *_: None)
    res["losses"] = ([r["loss"] for r in h_full], [r["loss"] for r in h1 + h2])
    res["valid"] = ([(r["step"], r["valid_loss"]) for r in h_full if "valid_loss" in r],
                    [(r["step"], r["valid_loss"]) for r in h1 + h2 if "valid_loss" in r])
    res["grad_norms"] = [r["grad_norm"] for r in h_full]
    ck_full, ck_part = os.path.join(full, "checkpoints"), os.path.join(part, "checkpoints")
    key = "embedding.word_embeddings.lang_weight"
    # tensors cross the result queue as lists (a tensor would go through shared memory of an exited process)
    res["lang"] = {tag: _tensor(ck_full, tag, key).tolist() for tag in ("step00000002", "step00000004")}
    res["lang_resumed"] = _tensor(ck_part, "step00000004", key).tolist()
    w_full, w_part = (torch.load(os.path.join(ck, "step00000004", "mp_rank_00_model_states.pt"),
                                 map_location="cpu", weights_only=False)["module"] for ck in (ck_full, ck_part))
    res["weights_keys"] = sorted(w_full)
    res["weights_differ"] = sorted(k for k, v in w_full.items() if torch.is_tensor(v) and v.is_floating_point()
                                   and not torch.equal(v, w_part[k])) + sorted(set(w_full) ^ set(w_part))
    assert key == LANG

    res["datasets"] = _dataset_alignment(config_path, base_dir)
    ps.destroy_model_parallel()
    res["evals"] = _evals(os.path.join(ck_full, "step00000004"), base_dir)
    ps.destroy_model_parallel()
    dist.barrier()
    parallel.destroy()
    from tests.workers import TINY

    res["tp1"] = lang_layouts(TINY, [["model.language_embedding=true"]])[0]
    return res


def _evals(ckpt: str, base_dir: str) -> Dict:
    """Scores with the trained model, then with its FR language row moved: only items with French change."""
    from evals.benchmarks import load_benchmark
    from evals.engine import forward, load_checkpoint_model
    from evals.errors import EvalError
    from evals.alignment import align_items
    from evals.scoring import score_items
    from evals.synthetic import build_benchmark, read_stories

    # the model trained at 32 positions; RoPE has no weights, so the eval may score longer items
    cfg, chunks = load_checkpoint_model(ckpt, ["model.max_position_embeddings=256"])
    bench = os.path.join(base_dir, "bench")
    stories = os.path.join(os.path.dirname(cfg.schedule.stages[0].data[0].path), "stories.jsonl")
    build_benchmark(read_stories(stories), bench, cfg.vocab, items_per_task=3)
    bm = load_benchmark(bench)
    pair = [it for it in bm.items if it.benchmark != "align"]
    align = [it for it in bm.items if it.benchmark == "align"]
    before = score_items(chunks, cfg, pair, "mean", False, 8)
    al_before = align_items(chunks, cfg, align, False, 8)
    emb = chunks[0].embedding.word_embeddings
    with torch.no_grad():
        emb.lang_weight[cfg.vocab.lang_id("fr")] += 0.5 * torch.randn(emb.lang_weight.shape[1],
                                                                      generator=torch.Generator().manual_seed(0))
    after = score_items(chunks, cfg, pair, "mean", False, 8)
    al_after = align_items(chunks, cfg, align, False, 8)
    try:
        forward(chunks, cfg, torch.tensor([[3 + cfg.vocab.offset] * 4]), None, lambda o: o)
        missing = None
    except EvalError as e:
        missing = str(e)
    return {"languages": [list(r["languages"]) for r in before], "before": [r["scores"] for r in before],
            "after": [r["scores"] for r in after], "align_before": al_before["cosine_per_layer"],
            "align_after": al_after["cosine_per_layer"], "missing_ids": missing}


def lang_layouts(config_path: str, layouts: Sequence[Sequence[str]], steps: int = 3) -> List[Dict]:
    """Like tests.workers.losses_for_layouts (fixed batch with random per-token languages), also
    returning the language table where this rank holds one (after the steps)."""
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.layers import has_language_embedding
    from megaslm.train import Trainer
    from tests.workers import fixed_batch, rank_slice

    results = []
    for overrides in layouts:
        cfg = load_config(config_path, list(overrides) + ["output_dir=/tmp/megaslm-test-lang"])
        trainer = Trainer(cfg, log=lambda *_: None)
        batch = fixed_batch(cfg)
        assert batch.lang_ids is not None
        losses, norms = [], []
        for _ in range(steps):
            out = trainer.train_step(rank_slice(batch, trainer.dp_rank, trainer.dp_size))
            losses.append(out["loss"])
            norms.append(float(out["grad_norm"]))
        table = None
        if has_language_embedding(trainer.chunks[0]):
            table = trainer.chunks[0].embedding.word_embeddings.lang_weight.detach().tolist()
        results.append({"layout": list(overrides), "losses": losses, "grad_norms": norms, "lang_weight": table,
                        "tp_rank": ps.get_tensor_model_parallel_rank()})
        ps.destroy_model_parallel()
        del trainer
    parallel.destroy()
    return results
