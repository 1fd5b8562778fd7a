"""Shared benchmark harness: timing (triton.testing.do_bench medians), device ceilings, result files.

Every bench script is runnable as ``python -m kernels.bench.<name>`` from the repository root. On a
machine without CUDA they exit with a one-line message unless ``--dry-run`` is given, which runs the
same plumbing at tiny sizes on CPU (Triton kernels through the interpreter, wall-clock medians) and
writes its result files to a temporary directory instead of ``kernels/bench/results``.

Result files: ``kernels/bench/results/<device-slug>-<UTC date>.json`` and ``.csv``; the JSON holds
the device name, measured copy bandwidth and bf16 matmul rate, git commit, date, torch/triton
versions and one row per (kernel, case, implementation).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU (Triton interpreter), results to a temp dir; checks plumbing only")
    p.add_argument("--out", type=Path, default=None, help="results directory (default kernels/bench/results)")
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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def measure_device(args) -> DeviceInfo:
    import triton

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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
    return DeviceInfo(name=name, slug=_slug(name), copy_gbps=copy_gbps, matmul_tflops=tflops,
                      commit=git_commit(), date=date, triton_version=triton.__version__, dry_run=args.dry_run)


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


def write_results(rows: List[Row], dev: DeviceInfo, args, tag: str) -> Optional[Path]:
    if args.no_write:
        return None
    rows = _ordered(rows)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="kernels-bench-dry-")) if args.dry_run else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dev.slug}-{dev.date[:10]}-{tag}"
    payload = {"device": asdict(dev), "rows": [asdict(r) for r in rows]}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        meta = ["device", "commit", "date", "copy_gbps", "matmul_tflops"]
        fields = list(asdict(rows[0]).keys()) if rows else []
        w.writerow(meta + fields)
        for r in rows:
            w.writerow([dev.name, dev.commit, dev.date, f"{dev.copy_gbps:.1f}", f"{dev.matmul_tflops:.1f}"]
                       + [getattr(r, k) for k in fields])
    print(f"# wrote {json_path} (+ .csv)")
    return json_path


def maybe_compile(fn, args):
    """torch.compile'd version of ``fn`` or None (dry-run / --no-compile)."""
    if args.no_compile or args.dry_run:
        return None
    return torch.compile(fn)
