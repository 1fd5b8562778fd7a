"""Pretrain a speech-unit LM:  deepspeed launchers/pretrain.py --config configs/tiny.yaml [a.b.c=value ...]

With no arguments it trains the tiny model on CPU on a synthetic EN/FR corpus built on the spot.
It resumes by itself from the newest complete checkpoint in <output_dir>/checkpoints (or checkpoint.load).
--dry-run validates the config for a world size (--world-size, else $WORLD_SIZE, else 1) and prints the
rank -> (tp, pp, dp) layout, the derived batch / schedule numbers and the per-rank GPU memory plan without
starting anything; with --gpu-memory GIB it refuses (exit 2) a layout whose worst rank does not fit.
Exit codes: 0 done (or pre-empted by SIGTERM after saving a checkpoint), 1 non-finite loss/gradient,
2 bad config or input.
"""
from __future__ import annotations

import os
import sys

from _common import ROOT, fail, parse, prepare_demo_data, with_demo_data


def _extra(p) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved parallel layout and schedule; start nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size for --dry-run (default: $WORLD_SIZE, else 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="with --dry-run: GiB per GPU; refuse (exit 2, one line naming the levers) when the "
                        "estimated worst rank does not fit (megaslm/memory.py; README: Memory plan)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if run-changing config fields differ from the checkpoint's")


def dry_run(cfg, world_size: int, out=print, gpu_memory_gib=None) -> None:
    """The resolved layout (ranks -> TP/PP/DP coordinates) and derived numbers, and the per-rank memory plan
    on a GPU (megaslm/memory.py); no process group. With ``gpu_memory_gib``, a worst rank that does not fit
    stops it with one line naming the shortfall and the levers (exit 2)."""
    from megaslm import memory
    from megaslm.data import stage_plans
    from megaslm.parallel import ParallelLayout
    from megaslm.telemetry import flops_per_token

    layout = ParallelLayout.from_config(cfg, world_size)
    s = cfg.schedule
    dp = layout.data
    per_rank = s.global_batch_size // dp
    out(f"config {cfg.name}: world size {world_size} = TP {layout.tensor} x PP {layout.pipeline} x DP {dp}"
        + (f" (virtual pipeline {layout.virtual_pipeline})" if layout.virtual_pipeline else "")
        + f", ZeRO-{cfg.parallel.zero_stage}")
    out(f"global batch {s.global_batch_size} sequences x {cfg.model.seq_length} tokens = "
        f"{cfg.tokens_per_step:,} tokens/step; per data-parallel rank {per_rank} sequences = "
        f"{cfg.num_micro_batches(world_size)} micro-batches of {s.micro_batch_size}")
    out(f"model: {cfg.num_parameters():,} parameters; {flops_per_token(cfg):.3e} FLOPs/token (6N + 12*L*H*S)")
    plans = stage_plans(cfg)
    total = sum(p.steps for p in plans)
    warm = s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_fraction * total))
    for i, p in enumerate(plans):
        data = ", ".join(f"{d.path} ({d.weight:g})" for d in cfg.schedule.stages[i].data) or "demo corpus"
        partial = "" if p.last_step_tokens == cfg.tokens_per_step else \
            f" (last step partial: {p.last_step_tokens:,} tokens)"
        out(f"stage {i} {p.name}: {p.tokens:,} tokens = {p.steps:,} steps{partial}; data: {data}")
    out(f"total {total:,} steps, {sum(p.tokens for p in plans):,} tokens; lr {cfg.optimizer.lr:g} "
        f"warm-up {warm:,} steps then {s.decay} decay")
    out("rank   tp  pp  dp")
    for c in layout.coordinates():
        out(f"{c['rank']:4d}  {c['tp']:3d} {c['pp']:3d} {c['dp']:3d}")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        fail(f"--gpu-memory: expected a positive number of GiB, got {gpu_memory_gib:g}")
    mem = memory.plan(cfg, world_size, gpu_memory_gib=gpu_memory_gib)
    for line in mem.table():
        out(line)
    if mem.fits is False:
        fail(mem.refusal())


def adopt_unit_source(cfg):
    """A config that names no tokeniser (``vocab.unit_source`` empty) takes the one its datasets record, when
    they all record the same one (units made by ``data_tools tokenize``): the resolved config then names it,
    and a checkpoint carries it to evals and sampling. Datasets that disagree, or a config that names another
    tokeniser, are refused later by the manifest check, naming the dataset."""
    import dataclasses

    from megaslm.vocab import VocabError, read_manifest

    if cfg.vocab.unit_source:
        return cfg
    sources = set()
    for st in cfg.schedule.stages:
        for src in st.data:
            try:
                sources.add(read_manifest(src.path)["vocab"].get("unit_source", ""))
            except (VocabError, OSError, TypeError, AttributeError):
                return cfg   # the manifest check names what is wrong
    if len(sources) != 1 or not next(iter(sources)):
        return cfg
    return dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, unit_source=sources.pop()))


def check_benchmarks(cfg) -> None:
    """With evaluation during training, every benchmark loads and maps units as this run does: refused in one
    line now, before anything is written, not at the first evaluation ``eval.interval`` steps later."""
    if not cfg.eval.interval:
        return
    from evals.benchmarks import check_vocab, load_benchmark
    from evals.errors import EvalError

    try:
        for path in cfg.eval.benchmarks:
            check_vocab(load_benchmark(path, cfg.eval.max_items).vocab, cfg.vocab, path)
    except EvalError as e:
        fail(str(e))


def main(argv=None, faults=None) -> int:
    """``faults``: test-only fault injection (a ``megaslm.train.Faults``), handed in by a test driver."""
    args, overrides = parse(__doc__.splitlines()[0], os.path.join(ROOT, "configs", "tiny.yaml"), argv, extra=_extra)
    # the config, its overrides and every rule that needs no GPU are checked torch-free (megaslm.config,
    # config_io, ports, evals.benchmarks): a typo is refused in a fraction of a second, not after torch's
    # import (seconds); torch comes in only for the CUDA rules
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config
    from megaslm.ports import env_world

    world = args.world_size if args.world_size is not None else env_world()["world_size"]
    if world < 1:
        fail(f"--world-size: expected an integer >= 1, got {world}")
    try:
        cfg = adopt_unit_source(load_config(args.config, overrides))
        cfg.validate(world_size=world)
        if args.dry_run:
            dry_run(cfg, world, gpu_memory_gib=args.gpu_memory)
            return 0
        check_benchmarks(cfg)
        import torch

        cfg.validate(world_size=world, cuda=torch.cuda.is_available())
        if cfg.data.demo and any(not st.data for st in cfg.schedule.stages):
            cfg = with_demo_data(cfg, prepare_demo_data(cfg, log=print if env_world()["rank"] == 0 else
                                                        (lambda *_: None)))
            cfg.validate(world_size=world, cuda=torch.cuda.is_available())
    except ConfigError as e:
        fail(str(e))
    evaluator = None
    if cfg.eval.interval:
        from evals.hooks import evaluate_chunks as evaluator
    from megaslm import parallel
    from megaslm.run import run
    from megaslm.train import NonFiniteError

    try:
        run(cfg, allow_config_change=args.allow_config_change, evaluator=evaluator, faults=faults)
    except ConfigError as e:
        fail(str(e))
    except NonFiniteError as e:
        parallel.destroy()   # every rank stops at the same step (the loss/gradient check is collective)
        fail(str(e), code=1)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
