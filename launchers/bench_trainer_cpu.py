"""Trainer speed on CPU vs a plain PyTorch loop of the same model, batch and sequence length:
    python launchers/bench_trainer_cpu.py [--sizes tiny demo] [--steps 30] [--out runs/bench_trainer_cpu]
                                          [--results docs/bench]

For each size, (1) ``launchers/pretrain.py`` trains ``--steps`` steps in a subprocess (tokens/s from the
step times in its metrics.jsonl: the lower quartile of the steps after ``--warmup``, as for the plain loop); (2) a plain loop in a second subprocess
builds the same megatron-core model (``megaslm.model.build_model``, same seed, same demo data, same
global batch / micro-batches / sequence length), and runs forward, backward, gradient clipping and
``torch.optim.AdamW`` with nothing else (no DeepSpeed, no accounting, no logging). Prints both figures
and their ratio, and stores the project's benchmark record (kernels/bench/record.py: device, commit, date, load,
command, the goal -- the trainer within 1.5x of the plain loop, issue 13 -- and whether it is met, the figures)
in ``--results`` (default the results folder docs/bench/) as ``bench_trainer_cpu-<device>-<date>.json``; the
runs themselves go to ``--out``.
``--attention A B ...`` (default ``sdpa reference``): the trainer runs once per attention backend, side by side
on the same data (the plain loop with the first); the per-step losses of every backend must agree with the
first's (relative 1e-4), else the script fails: a faster path that computes something else is no figure.
Sizes: ``tiny`` = configs/tiny.yaml (~0.2M parameters); ``demo`` = 6 layers x 256 wide (~4.5M).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import ROOT, fail, parse, prepare_demo_data, with_demo_data  # noqa: E402

from kernels.bench import record  # noqa: E402

SIZES = {
    "tiny": [],
    "demo": ["model.num_layers=6", "model.hidden_size=256", "model.ffn_hidden_size=704",
             "model.num_attention_heads=4", "model.num_query_groups=2"],
}


def _extra(p):
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figure")
    p.add_argument("--out", default=os.path.join("runs", "bench_trainer_cpu"), help="where the runs go")
    p.add_argument("--results", default=None, help="results folder for the record (default docs/bench)")
    p.add_argument("--attention", nargs="+", default=["sdpa", "reference"], choices=["sdpa", "reference", "triton"],
                   help="attention backends timed side by side (the plain loop uses the first)")
    p.add_argument("--plain", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop here


def _overrides(size, out, steps):
    return SIZES[size] + [f"output_dir={out}", f"schedule.stages.0.train_steps={steps}", "checkpoint.save=false",
                          "logging.interval=1", "data.demo_stories=300"]


def lower_quartile(times):
    """The 25th percentile of step times: on a shared machine the slow steps measure the neighbours."""
    return statistics.quantiles(times, n=4)[0]


def plain_loop(config, overrides, warmup: int) -> float:
    """tokens/s of a bare loop over the same model and data (lower-quartile step time after ``warmup``)."""
    import torch

    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.data import build_stage_dataset, load_step
    from megaslm.model import build_model
    from megaslm.train import param_groups

    cfg = load_config(config, overrides)
    cfg = with_demo_data(cfg, prepare_demo_data(cfg, log=lambda *_: None)).validate(world_size=1, cuda=False)
    parallel.initialize(cfg)
    torch.set_num_threads(cfg.cpu_threads_per_rank(1))   # the trainer's thread count (parallel.cpu_threads)
    [model] = build_model(cfg)
    opt = torch.optim.AdamW(param_groups([model], cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    steps = cfg.total_steps()
    ds = build_stage_dataset(cfg, cfg.schedule.stages[0], steps * cfg.schedule.global_batch_size)
    n_micro = cfg.schedule.global_batch_size // cfg.schedule.micro_batch_size
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = load_step(ds, cfg, step, 0, 1)
        T = batch.loss_mask.sum()
        for mb in batch.split(n_micro):
            out = model(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
            ((out.float() * mb.loss_mask).sum() / T).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    parallel.destroy()
    return cfg.tokens_per_step / lower_quartile(times[warmup:])


def trainer_run(config, overrides, out, warmup: int):
    """(tokens/s, per-step losses) of launchers/pretrain.py with ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--config", config,
                        *overrides], env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"pretrain.py failed ({p.returncode}): {p.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"loss"' in line]
    return (recs[-1]["step_tokens"] / lower_quartile([r["step_time_s"] for r in recs[warmup:]]),
            [r["loss"] for r in recs])


def goals(results) -> list:
    """Issue 13: the trainer within 1.5x of the plain loop, at every size measured."""
    ratios = [r["plain_over_trainer"] for r in results]
    return [record.goal("plain loop tokens/s over the trainer's (worst size)", max(ratios) if ratios else None,
                        "<=", 1.5, "x")]


def main(argv=None) -> int:
    args, overrides = parse(__doc__.splitlines()[0], os.path.join(ROOT, "configs", "tiny.yaml"), argv, extra=_extra)
    if args.steps <= args.warmup + 2:
        fail(f"--steps: expected more than --warmup + 2 = {args.warmup + 2}, got {args.steps}")
    if args.plain:   # the plain loop runs in its own process (a fresh interpreter, like the trainer)
        size, out = args.plain.split(":", 1)
        print(json.dumps({"plain_tokens_per_s": plain_loop(args.config, _overrides(size, out, args.steps) + overrides,
                                                          args.warmup)}))
        return 0
    run = record.Run("bench_trainer_cpu", argv, prog="python launchers/bench_trainer_cpu.py")
    results = []
    for size in args.sizes:
        out = os.path.abspath(os.path.join(args.out, size))
        trainer, losses = {}, {}
        for backend in args.attention:
            run_out = out if backend == args.attention[0] else f"{out}-{backend}"
            if os.path.exists(os.path.join(run_out, "metrics.jsonl")):
                os.remove(os.path.join(run_out, "metrics.jsonl"))
            ov = _overrides(size, run_out, args.steps) + [f"model.attention_backend={backend}"] + overrides
            trainer[backend], losses[backend] = trainer_run(args.config, ov, run_out, args.warmup)
        first = args.attention[0]
        for backend in args.attention[1:]:
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses[backend], losses[first]))
            if len(losses[backend]) != len(losses[first]) or worst > 1e-4:
                fail(f"{size}: attention {backend} and {first} disagree: per-step losses differ by {worst:.2e} "
                     f"(relative; expected <= 1e-4)")
        plain_ov = [f"model.attention_backend={first}"] + overrides
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config, "--steps",
                            str(args.steps), "--warmup", str(args.warmup), "--plain", f"{size}:{out}-plain", *plain_ov],
                           cwd=ROOT, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k not in ("MASTER_PORT",)})
        if p.returncode != 0:
            fail(f"plain loop failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        plain = json.loads(p.stdout.strip().splitlines()[-1])["plain_tokens_per_s"]
        from megaslm.config_io import load_config

        n = load_config(args.config, _overrides(size, out, args.steps) + overrides).num_parameters()
        row = {"size": size, "parameters": n, "steps": args.steps, "warmup_steps_left_out": args.warmup,
               "statistic": "lower quartile of step time", "attention": first,
               "trainer_tokens_per_s": round(trainer[first], 1), "plain_tokens_per_s": round(plain, 1),
               "plain_over_trainer": round(plain / trainer[first], 3),
               "trainer_tokens_per_s_by_attention": {b: round(t, 1) for b, t in trainer.items()},
               "losses_agree_rel_1e-4": True}
        side = " | ".join(f"{b} {t:,.0f}" for b, t in trainer.items())
        print(f"{size:5s} {n:>10,} params: trainer ({side}) tok/s | plain loop ({first}) {plain:,.0f} tok/s | "
              f"plain/trainer {plain / trainer[first]:.2f}x"
              + "".join(f" | {first}/{b} {trainer[first] / trainer[b]:.2f}x" for b in args.attention[1:]))
        results.append(row)
    import torch

    path = run.write(record.cpu_device(), {"results": results}, goals(results), out=args.results,
                     environment={"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
