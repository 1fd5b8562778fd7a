"""Training throughput of the presets on one device, per attention backend and recompute mode:
    python launchers/bench_train.py [--presets qwen2-360m llama3.2-1b] [--backends flex triton]
                                    [--recompute none selective full]
                                    [--steps 20] [--warmup 5] [--micro-batch-size 8] [--global-batch-size 16]
                                    [--out runs/bench_train] [--results docs/bench]
    python launchers/bench_train.py --dry-run      # the same plumbing on CPU with the tiny model (seconds)

Each (preset, backend, recompute) runs in its own process (a fresh allocator and a fresh Triton cache state): the
real ``megaslm.train.Trainer`` (megatron-core GPTModel under DeepSpeed ZeRO-1, bf16 on GPU) trains the preset
at sequence 2048 on packed documents (the synthetic EN/FR demo corpus, built once per run directory by
data_tools' real pipeline, at the preset's 2048-unit vocabulary). The first ``--warmup`` steps are left out
(compilation, autotuning, allocator growth). Reported per run:

- tokens/s: tokens of the timed steps / their wall time (median step time, and the mean);
- MFU: the telemetry's formula, stated in ``megaslm/telemetry.py``:
  ``(6 N + 12 L H S) * tokens/s / (world * peak)``, peak = the device's dense bf16 tensor-core FLOP/s;
- peak memory: ``torch.cuda.max_memory_allocated`` (GPU only): what ``--recompute`` buys;
- the first timed steps' losses (the backends train the same batches from the same weights: they should
  agree to bf16 precision, which the table lets one check by eye);
- step-time breakdown: data (load + host->device of the step's batch), forward+backward (incl. the step's
  loss/flag reductions), optimizer (DeepSpeed ``engine.step``: ZeRO reduction, clipping, AdamW), each the
  median over the timed steps. The breakdown synchronises the device at each boundary (only in this
  script; the trainer itself does not), so its sum is a little above the un-instrumented step time,
  which is measured on separate steps without the boundaries.

The runs go to ``--out``; the project's benchmark record (kernels/bench/record.py: device, commit, date, load,
command, every figure, and the goals -- issue 14: >= 40% MFU at 360M, >= 50% at 1B on one H100, each judged on
the preset's best row -- and whether they are met) goes to ``--results`` (default the results folder
docs/bench/; with ``--dry-run``, ``--out``) as ``bench_train-<device>-<date>.json``, with the Markdown table
beside it (``.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import ROOT, fail, prepare_demo_data, with_demo_data  # noqa: E402

from kernels.bench import record  # noqa: E402
from megaslm.ports import free_port  # noqa: E402

PRESETS = {"qwen2-360m": "configs/qwen2-360m.yaml", "llama3.2-1b": "configs/llama3.2-1b.yaml",
           "tiny": "configs/tiny.yaml"}
GOALS = {"qwen2-360m": 0.40, "llama3.2-1b": 0.50}   # MFU on one H100 (issue 14 item 3)



def goals(rows) -> list:
    """Issue 14 item 3: MFU per preset that has a goal, judged on its best row (backend, recompute mode)."""
    out = []
    for preset, target in GOALS.items():
        mine = [r for r in rows if r["preset"] == preset]
        if mine:
            mfus = [r["mfu"] for r in mine if r.get("mfu") is not None]
            out.append(record.goal(f"{preset} MFU on one GPU (best backend / recompute mode run)",
                                   max(mfus) if mfus else None, ">=", target))
    return out


def bench_config(preset: str, backend: str, args, recompute: str = "none"):
    """The preset's model at its own shape, one bench stage on the demo corpus, no checkpoints."""
    import dataclasses

    from megaslm.config import StageConfig
    from megaslm.config_io import load_config

    out = os.path.abspath(os.path.join(args.out, "runs", f"{preset}-{backend}-{recompute}"))
    data_dir = os.path.abspath(os.path.join(args.out, "runs", f"data-{preset}"))
    emb = backend if backend in ("triton", "reference") else "auto"   # flex / sdpa: the embedding's own default
    overrides = [f"output_dir={out}", f"model.attention_backend={backend}", f"model.embedding_backend={emb}",
                 f"model.recompute={recompute}",
                 "checkpoint.save=false", "logging.interval=1000000", "logging.tensorboard=false",
                 f"schedule.micro_batch_size={args.micro_batch_size}",
                 f"schedule.global_batch_size={args.global_batch_size}", "schedule.warmup_steps=1",
                 "data.demo=true", f"data.demo_stories={args.demo_stories}", "eval.interval=0"]
    if args.seq_length:
        overrides.append(f"model.seq_length={args.seq_length}")
    cfg = load_config(os.path.join(ROOT, PRESETS[preset]), overrides)
    total = args.warmup + 2 * args.steps   # timed without boundaries, then timed with the breakdown
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(
        cfg.schedule, stages=[StageConfig(name="bench", train_steps=total)]))
    # the demo corpus is shared by both backends of a preset: build it once beside the runs
    demo_cfg = dataclasses.replace(cfg, output_dir=data_dir)
    return with_demo_data(cfg, prepare_demo_data(demo_cfg, log=lambda *_: None))


def child(preset: str, backend: str, args, recompute: str = "none") -> dict:
    """One (preset, backend, recompute) measurement in this process."""
    import torch

    from megaslm import parallel, telemetry
    from megaslm.data import load_step
    from megaslm.train import Trainer

    cfg = bench_config(preset, backend, args, recompute)
    cuda = torch.cuda.is_available()
    cfg.validate(world_size=1, cuda=cuda)
    os.makedirs(cfg.output_dir, exist_ok=True)
    trainer = Trainer(cfg, log=lambda *_: None)
    dev = trainer.device
    ds = trainer.stage_dataset(0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    engine_step = trainer.engine.step
    phase = {"opt": 0.0}

    def timed_engine_step(*a, **k):
        sync()
        t = time.perf_counter()
        r = engine_step(*a, **k)
        sync()
        phase["opt"] = time.perf_counter() - t
        return r

    step = 0
    plain, data_t, fb_t, opt_t, losses = [], [], [], [], []
    for i in range(args.warmup + 2 * args.steps):
        breakdown = i >= args.warmup + args.steps
        trainer.engine.step = timed_engine_step if breakdown else engine_step
        sync()
        t0 = time.perf_counter()
        batch = load_step(ds, cfg, step, 0, 1)
        if breakdown:
            batch = batch.to(dev)
            sync()
        t1 = time.perf_counter()
        out = trainer.train_step(batch)
        sync()
        losses.append(out["loss"])
        t2 = time.perf_counter()
        step += 1
        trainer.step = step
        if i < args.warmup:
            if cuda and i == args.warmup - 1:
                torch.cuda.reset_peak_memory_stats()
            continue
        if breakdown:
            data_t.append(t1 - t0)
            opt_t.append(phase["opt"])
            fb_t.append(t2 - t1 - phase["opt"])
        else:
            plain.append(t2 - t0)
    trainer.engine.step = engine_step
    tokens = cfg.tokens_per_step
    med = statistics.median(plain)
    tps = tokens / med
    name = torch.cuda.get_device_name() if cuda else "cpu"
    precision = cfg.resolved_precision(cuda)
    m = telemetry.mfu(cfg, tps, 1, name if cuda else None, precision)
    rec = {"preset": preset, "backend": backend, "recompute": recompute, "parameters": cfg.num_parameters(),
           "first_losses": [round(x, 5) for x in losses[:3]],
           "seq_length": cfg.model.seq_length, "micro_batch_size": cfg.schedule.micro_batch_size,
           "global_batch_size": cfg.schedule.global_batch_size, "tokens_per_step": tokens,
           "precision": precision, "zero_stage": cfg.parallel.zero_stage, "timed_steps": len(plain),
           "step_time_median_s": med, "step_time_mean_s": statistics.mean(plain),
           "tokens_per_s": tps, "tokens_per_s_mean": tokens / statistics.mean(plain),
           "flops_per_token": telemetry.flops_per_token(cfg), "mfu": m,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "breakdown_median_s": {"data": statistics.median(data_t), "forward_backward": statistics.median(fb_t),
                                  "optimizer": statistics.median(opt_t)}}
    trainer.close()
    parallel.destroy()
    return rec


def _table(rows) -> str:
    lines = ["| preset | backend | recompute | tokens/s | MFU | goal | peak mem GiB | step ms | "
             "data / fwd+bwd / optim ms | loss, steps 1-3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['backend']} | {r.get('recompute', 'none')} | failed: {r['error']} "
                         "| | | | | | |")
            continue
        b = r["breakdown_median_s"]
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        goal = GOALS.get(r["preset"])
        met = "" if goal is None or r["mfu"] is None else (f"{goal:.0%} {'met' if r['mfu'] >= goal else 'NOT met'}")
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['backend']} | {r.get('recompute', 'none')} | {r['tokens_per_s']:,.0f} | "
                     f"{mfu} | {met} | {mem} | {r['step_time_median_s'] * 1000:.0f} | {b['data'] * 1000:.0f} / "
                     f"{b['forward_backward'] * 1000:.0f} / {b['optimizer'] * 1000:.0f} | "
                     f"{', '.join(f'{x:.4f}' for x in r.get('first_losses', []))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-360m", "llama3.2-1b"], choices=list(PRESETS))
    p.add_argument("--backends", nargs="+", default=["flex", "triton"],
                   choices=["flex", "sdpa", "triton", "reference"], help="attention backends (model.attention_backend)")
    p.add_argument("--recompute", nargs="+", default=["none"], choices=["none", "selective", "full"],
                   help="activation recompute modes (model.recompute), each with every backend")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's (2048)")
    p.add_argument("--demo-stories", type=int, default=3000)
    p.add_argument("--out", default=None, help="where the runs go (default: runs/bench_train; runs/bench_train_dry "
                                               "with --dry-run)")
    p.add_argument("--results", default=None, help="results folder for the record (default: docs/bench; --out "
                                                   "with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU plumbing check: the tiny model, reference backend, sequence 128, 3 steps "
                        "(each --recompute mode)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.presets, args.backends = ["tiny"], ["reference"]
        args.steps, args.warmup, args.micro_batch_size, args.global_batch_size = 3, 1, 2, 4
        args.seq_length, args.demo_stories = 128, 200
    if args.out is None:
        args.out = os.path.join("runs", "bench_train_dry" if args.dry_run else "bench_train")
    if args.results is None and args.dry_run:
        args.results = args.out
    if args.steps < 1 or args.warmup < 1:
        fail(f"--steps and --warmup: expected integers >= 1, got {args.steps} and {args.warmup}")
    if args.global_batch_size % args.micro_batch_size:
        fail(f"--global-batch-size: expected a multiple of --micro-batch-size={args.micro_batch_size}, "
             f"got {args.global_batch_size}")
    if args.child:
        preset, backend, recompute = args.child.split(":")
        print("RESULT " + json.dumps(child(preset, backend, args, recompute)))
        return 0
    run = record.Run("bench_train", argv, prog="python launchers/bench_train.py")
    rows = []
    for preset in args.presets:
        for backend, recompute in [(b, r) for r in args.recompute for b in args.backends]:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                       LOCAL_RANK="0")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{preset}:{backend}:{recompute}",
                   *[a for a in (argv if argv is not None else sys.argv[1:])]]
            t = time.time()
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            res = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
            if r.returncode != 0 or not res:
                tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                rows.append({"preset": preset, "backend": backend, "recompute": recompute, "error": tail[:300]})
                print(f"{preset} {backend} recompute={recompute}: FAILED ({tail[:300]})", file=sys.stderr)
                continue
            row = json.loads(res[-1])
            row["wall_s"] = round(time.time() - t, 1)
            rows.append(row)
            print(f"{preset} {backend} recompute={recompute}: {row['tokens_per_s']:,.0f} tok/s"
                  + (f", MFU {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""), flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else record.cpu_device()
    rec = run.record(device, {"mfu_formula": "(6N + 12*L*H*S) * tokens/s / (world * dense bf16 peak), "
                                             "megaslm/telemetry.py", "results": rows},
                     goals(rows), dry_run=args.dry_run, environment={"torch": torch.__version__})
    table = (f"device {device}, commit {rec['commit']}, {rec['date']}\n\n`{rec['command']}`\n\n{_table(rows)}\n")
    path = record.write_record(rec, args.results, companions={".md": table})
    print(_table(rows))
    print(f"wrote {path} (+ .md)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
