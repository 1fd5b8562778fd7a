"""Timing harness of the kernel benchmarks: triton.testing.do_bench medians, device ceilings, rows and tables.

Every bench script is runnable as ``python -m kernels.bench.<name>`` from the repository root. On a
machine without CUDA they exit with a one-line message unless ``--dry-run`` is given, which runs the
same plumbing at tiny sizes on CPU (Triton kernels through the interpreter, wall-clock medians) and
writes its record to a temporary directory instead of the results folder.

Results go through the project's one record format (``kernels/bench/record.py``) into the one results folder
``docs/bench/``: ``bench_<tag>-<device slug>-<UTC date and time>.json`` -- device, commit, date, load, command,
the goals (kernels/README.md "Targets") and whether they are met, and as figures the measured copy bandwidth
and bf16 matmul rate and one row per (kernel, case, implementation) -- with the same rows as a ``.csv`` beside it.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from kernels.bench import record


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU (Triton interpreter), results to a temp dir; checks plumbing only")
    p.add_argument("--out", type=Path, default=None, help="results folder (default docs/bench; a temp dir with --dry-run)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    return p


def require_cuda_or_dry_run(args) -> None:
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("benchmarks need a CUDA device (none found); use --dry-run for a CPU plumbing check")


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], args, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()``: do_bench on CUDA, a few wall-clock runs in dry-run on CPU."""
    if torch.cuda.is_available() and not args.dry_run:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def guarded(fn: Callable[[], float]) -> Dict[str, object]:
    """Run a timing closure; turn OOM / unsupported into a status instead of aborting the sweep."""
    try:
        return {"ms": fn(), "status": "ok"}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": float("nan"), "status": "oom"}
    except Exception as e:  # noqa: BLE001 - a baseline failing must not hide the others
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return {"ms": float("nan"), "status": f"error {msg}"}


# ----------------------------------------------------------------------------------------------
# device ceilings
# ----------------------------------------------------------------------------------------------
@dataclass
class DeviceInfo:
    name: str
    slug: str
    copy_gbps: float  # measured device-to-device copy: (read + write) bytes / time
    matmul_tflops: float  # measured dense bf16 matmul
    commit: str
    date: str
    torch_version: str = torch.__version__
    triton_version: str = ""
    dry_run: bool = False
    extra: Dict[str, object] = field(default_factory=dict)
    run: Optional[record.Run] = field(default=None, repr=False)  # started before the device was measured


def measure_device(args) -> DeviceInfo:
    import triton

    run = record.Run("bench")   # date, commit, load and command as the run starts; named when it is written
    if torch.cuda.is_available() and not args.dry_run:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
        n = 1 << 29  # 1 GiB of bf16
        src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), args)
        copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
        ms = time_ms(lambda: a @ b, args)
        tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
    else:
        name = "cpu-dry-run"
        src = torch.empty(1 << 22, dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), args)
        copy_gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
        a = torch.randn(256, 256)
        ms = time_ms(lambda: a @ a, args)
        tflops = 2 * 256 ** 3 / (ms * 1e-3) / 1e12
    return DeviceInfo(name=name, slug=record.slug(name), copy_gbps=copy_gbps, matmul_tflops=tflops,
                      commit=run.commit, date=run.date, triton_version=triton.__version__, dry_run=args.dry_run,
                      run=run)


# ----------------------------------------------------------------------------------------------
# rows, tables, files
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    kernel: str  # embedding_fwd, embedding_bwd, attention_fwd, attention_fwd_bwd, doc_mask
    case: str  # shape description
    impl: str  # triton, eager, compile, sdpa_dense_mask, flex_doc_mask, ...
    dtype: str
    ms: float
    status: str = "ok"
    gbytes: Optional[float] = None  # bytes moved (for GB/s)
    tflop: Optional[float] = None  # useful FLOPs (for TFLOP/s)
    gbps: Optional[float] = None
    pct_copy_bw: Optional[float] = None
    tflops: Optional[float] = None
    pct_matmul: Optional[float] = None
    speedup_vs: Optional[str] = None
    speedup: Optional[float] = None
    ratio_vs_flex: Optional[float] = None      # attention: FlexAttention time / this time (same mask)
    pct_of_fa2_causal: Optional[float] = None  # attention: TFLOP/s on allowed pairs / causal FA2's TFLOP/s
    shape: Optional[dict] = None               # attention: B, S, Hq, Hkv, D (what kernels/choice.py matches)


def make_row(kernel, case, impl, dtype, timing, dev: DeviceInfo, gbytes=None, tflop=None, shape=None) -> Row:
    ms = timing["ms"]
    row = Row(kernel, case, impl, str(dtype).replace("torch.", ""), ms, timing["status"], gbytes, tflop, shape=shape)
    if timing["status"] == "ok" and ms > 0:
        if gbytes is not None:
            row.gbps = gbytes / (ms * 1e-3)
            row.pct_copy_bw = 100.0 * row.gbps / dev.copy_gbps
        if tflop is not None:
            row.tflops = tflop / (ms * 1e-3)
            row.pct_matmul = 100.0 * row.tflops / dev.matmul_tflops
    return row


def add_speedups(rows: List[Row], target_impl: str = "triton") -> None:
    """For each (kernel, case, dtype) group: speedup of the target impl over every other impl."""
    groups: Dict[tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.case, r.dtype), []).append(r)
    for grp in groups.values():
        targets = [r for r in grp if r.impl.startswith(target_impl) and r.status == "ok"]
        if not targets:
            continue
        best = min(targets, key=lambda r: r.ms)
        for r in grp:
            if r is not best and r.status == "ok" and not r.impl.startswith(target_impl):
                r.speedup_vs, r.speedup = best.impl, r.ms / best.ms


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def _ordered(rows: List[Row]) -> List[Row]:
    keys: Dict[tuple, int] = {}
    for r in rows:
        keys.setdefault((r.kernel, r.case), len(keys))
    return sorted(rows, key=lambda r: keys[(r.kernel, r.case)])


def print_table(rows: List[Row], dev: DeviceInfo) -> None:
    rows = _ordered(rows)
    print(f"# device: {dev.name} | copy {dev.copy_gbps:.0f} GB/s | bf16 matmul {dev.matmul_tflops:.1f} TFLOP/s | "
          f"commit {dev.commit} | {dev.date}{' | DRY RUN (numbers meaningless)' if dev.dry_run else ''}")
    cols = ["kernel", "case", "impl", "dtype", "ms", "GB/s", "%copy", "TFLOP/s", "%mm", "triton x", "status"]
    table = [[r.kernel, r.case, r.impl, r.dtype, _fmt(r.ms, 3), _fmt(r.gbps, 0), _fmt(r.pct_copy_bw, 1),
              _fmt(r.tflops, 1), _fmt(r.pct_matmul, 1), _fmt(r.speedup, 2), r.status[:60]] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(cols))
    print(line(["-" * w for w in widths]))
    for t in table:
        print(line(t))


# the targets of kernels/README.md, each judged on its worst case: (name, kernel, impl, row field, op, target,
# unit, which rows); a benchmark that measured no such row states no such goal
GOALS = [
    ("attention fwd+bwd vs FlexAttention, same mask (worst case)", "attention_fwd_bwd", "triton", "ratio_vs_flex",
     ">=", 1.0, "x", None),
    ("attention fwd+bwd TFLOP/s on allowed pairs vs causal FA2 (worst case)", "attention_fwd_bwd", "triton",
     "pct_of_fa2_causal", ">=", 75.0, "%", None),
    ("embedding forward, share of measured copy bandwidth (worst case)", "embedding_fwd", "triton", "pct_copy_bw",
     ">=", 80.0, "%", None),
    ("embedding backward vs torch (megatron's ops) at V=2048, H=2048 (worst case)", "embedding_bwd",
     "eager_megatron", "speedup", ">=", 2.0, "x", lambda r: " V=2048 " in r.case and " H=2048 " in r.case),
]


def goals(rows: List[Row]) -> List[dict]:
    """The targets these rows can judge; a goal whose rows were not all measured is unknown (None)."""
    out = []
    for name, kernel, impl, key, op, target, unit, which in GOALS:
        mine = [r for r in rows if r.kernel == kernel and r.impl == impl and (which is None or which(r))]
        if not mine:
            continue
        vals = [getattr(r, key) for r in mine if r.status == "ok" and getattr(r, key) is not None]
        worst = (min(vals) if op == ">=" else max(vals)) if vals and len(vals) == len(mine) else None
        out.append(record.goal(name, worst, op, target, unit))
    return out


def write_results(rows: List[Row], dev: DeviceInfo, args, tag: str) -> Optional[Path]:
    """The record (``bench_<tag>``) and its rows as ``.csv``, into ``--out`` (default docs/bench; a temp dir
    when dry-running)."""
    if args.no_write:
        return None
    import tempfile

    rows = _ordered(rows)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="kernels-bench-dry-")) if args.dry_run else record.RESULTS_DIR)
    buf = io.StringIO()
    w = csv.writer(buf)
    fields = list(asdict(rows[0]).keys()) if rows else []
    w.writerow(["device", "commit", "date", "copy_gbps", "matmul_tflops"] + fields)
    for r in rows:
        w.writerow([dev.name, dev.commit, dev.date, f"{dev.copy_gbps:.1f}", f"{dev.matmul_tflops:.1f}"]
                   + [getattr(r, k) for k in fields])
    run = dev.run or record.Run("bench")
    run.benchmark = f"bench_{tag}"
    path = run.write(dev.name, {"copy_gbps": dev.copy_gbps, "matmul_tflops": dev.matmul_tflops,
                                "rows": [asdict(r) for r in rows], **dev.extra},
                     goals(rows), out=out_dir, companions={".csv": buf.getvalue()}, dry_run=dev.dry_run,
                     environment={"torch": dev.torch_version, "triton": dev.triton_version})
    print(f"# wrote {path} (+ .csv)")
    return path


def maybe_compile(fn, args):
    """torch.compile'd version of ``fn`` or None (dry-run / --no-compile)."""
    if args.no_compile or args.dry_run:
        return None
    return torch.compile(fn)
