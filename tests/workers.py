"""Functions run inside spawned ranks by the multi-process tests (importable by module path)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def fixed_batch(cfg, seed: int = 0):
    """A deterministic global batch with random documents (eod ~3% of tokens)."""
    from megaslm.data import make_batch

    g = torch.Generator().manual_seed(seed)
    G, S = cfg.schedule.global_batch_size, cfg.model.seq_length
    toks = torch.randint(cfg.vocab.offset, cfg.vocab.size, (G, S + 1), generator=g)
    toks[torch.rand(G, S + 1, generator=g) < 0.03] = cfg.vocab.eod_id
    lang = None
    if cfg.model.language_embedding:  # a random language per token (drawn after the tokens: same tokens either way)
        lang = torch.randint(1, cfg.vocab.num_lang_ids, (G, S), generator=g)
        lang[toks[:, :-1] < cfg.vocab.offset] = 0
    return make_batch(toks[:, :-1], toks[:, 1:], None, cfg.vocab, lang_ids=lang)


def rank_slice(batch, dp_rank: int, dp_size: int):
    from megaslm.data import Batch, step_sample_range

    a, b = step_sample_range(0, batch.num_sequences, dp_rank, dp_size)
    return Batch(batch.tokens[a:b], batch.labels[a:b], batch.loss_mask[a:b], batch.position_ids[a:b], batch.segment_ids[a:b],
                 None if batch.lang_ids is None else batch.lang_ids[a:b])


def losses_for_layouts(config_path: str, layouts: Sequence[Sequence[str]], steps: int = 3, out_dir: str = "") -> List[Dict]:
    """Train ``steps`` optimizer steps on a fixed batch under each layout (list of overrides), in turn."""
    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.train import Trainer

    results = []
    for overrides in layouts:
        cfg = load_config(config_path, list(overrides) + [f"output_dir={out_dir or '/tmp/megaslm-test'}"])
        trainer = Trainer(cfg, log=lambda *_: None)
        batch = fixed_batch(cfg)
        losses, norms = [], []
        for _ in range(steps):
            out = trainer.train_step(rank_slice(batch, trainer.dp_rank, trainer.dp_size))
            losses.append(out["loss"])
            norms.append(float(out["grad_norm"]) if out["grad_norm"] is not None else float("nan"))
        results.append({"layout": list(overrides), "losses": losses, "grad_norms": norms})
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        del trainer
    parallel.destroy()
    return results


def count_parameters(config_path: str) -> int:
    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.model import build_model, num_parameters

    cfg = load_config(config_path)
    parallel.initialize(cfg)
    n = num_parameters(build_model(cfg))
    parallel.destroy()
    return n


def with_demo_corpus(cfg):
    """``cfg`` with its data-less stages on a demo corpus built in ``<output_dir>/data`` (what
    launchers/pretrain.py does for data.demo; tests call megaslm.run.run directly), once for all ranks."""
    from data_tools.synthetic import prepare_demo_corpus
    from megaslm.data import with_default_data

    prefixes = prepare_demo_corpus(os.path.join(cfg.output_dir, "data"), seed=cfg.data.seed,
                                   num_stories=cfg.data.demo_stories, codebook_size=cfg.vocab.codebook_size)
    return with_default_data(cfg, prefixes["enfr_interleaved"])


def train_with_eval(out_dir: str):
    from data_tools.synthetic import write_demo_corpus
    from evals.synthetic import build_benchmark, read_stories
    from megaslm.config_io import load_config
    from evals.hooks import evaluate_chunks
    from megaslm.run import run

    data = os.path.join(out_dir, "data")
    prefixes = write_demo_corpus(data, seed=0, num_stories=120, codebook_size=128)
    cfg0 = load_config(TINY)
    bench = os.path.join(out_dir, "bench")
    build_benchmark(read_stories(os.path.join(data, "stories.jsonl")), bench, cfg0.vocab, items_per_task=6)
    cfg = load_config(TINY, [
        f"output_dir={out_dir}/run", "data.demo=false", "schedule.stages.0.train_steps=4",
        f"schedule.stages.0.data=[{{path: {prefixes['enfr_interleaved']}, weight: 1.0}}]",
        "eval.interval=2", f"eval.benchmarks=[{bench}]", "eval.batch_size=8", "checkpoint.save=false"])
    run(cfg, log=lambda *_: None, evaluator=evaluate_chunks)
    return True


def grads_for_layouts(config_path: str, layouts: Sequence[Sequence[str]], out_dir: str = "") -> List[Dict]:
    """One forward/backward of the fixed batch per layout (PP=1, ZeRO-0, no optimizer step): the L2 norm of
    every parameter's FULL gradient by canonical name (TP shards' squares summed over the TP group; a
    replicated parameter's gradient must already be whole on each rank, e.g. a sequence-parallel norm's)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.config_io import load_config
    from megaslm.layers import language_ids
    from megaslm.train import Trainer

    results = []
    for overrides in layouts:
        cfg = load_config(config_path, list(overrides) + ["parallel.zero_stage=0",
                                                          f"output_dir={out_dir or '/tmp/megaslm-test'}"])
        trainer = Trainer(cfg, log=lambda *_: None)
        batch = rank_slice(fixed_batch(cfg), trainer.dp_rank, trainer.dp_size)
        scale = 1.0 / float(batch.loss_mask.sum())
        for mb in batch.split(batch.num_sequences // cfg.schedule.micro_batch_size):
            with language_ids(trainer.chunks[0], mb.lang_ids):
                out = trainer.engine(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
            trainer.engine.backward((out.float() * mb.loss_mask).sum() * scale, scale_wrt_gas=False)
        norms = {}
        for _, p, spec in sharding.iter_params(trainer.chunks, cfg):
            sq = p.grad.double().pow(2).sum()
            if spec.split_dim >= 0 and spec.tp_size > 1:
                dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
            norms[spec.canonical] = float(sq.sqrt())
        results.append({"layout": list(overrides), "grad_norms": norms})
        ps.destroy_model_parallel()
        del trainer
    parallel.destroy()
    return results


def logits_for_layouts(config_path: str, layouts: Sequence[Sequence[str]]) -> List[Dict]:
    """Forward only (no grad) of the fixed batch's first sequences through build_model per layout (TP=1, PP=1):
    the full-vocabulary logits, and the attention backend every layer resolved to."""
    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.layers import DocumentMaskedAttention
    from megaslm.model import build_model

    results = []
    for overrides in layouts:
        cfg = load_config(config_path, list(overrides))
        parallel.initialize(cfg)
        [model] = build_model(cfg)
        model.eval()
        batch = fixed_batch(cfg)
        with torch.no_grad():
            logits = model(batch.tokens[:2], batch.position_ids[:2], attention_mask=batch.segment_ids[:2])
        backends = sorted({m.backend for m in model.modules() if isinstance(m, DocumentMaskedAttention)})
        results.append({"layout": list(overrides), "logits": logits.float().tolist(), "backends": backends})
        parallel.destroy()
    return results
