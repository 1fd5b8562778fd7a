"""Compile every Triton kernel variant the product launches, for sm_80 and sm_90, without a GPU.

    python -m kernels.bench.compile_all                 # all variants, both archs -> docs/bench/
    python -m kernels.bench.compile_all --archs 90 --filter "attention fwd bfloat16 D64" --out /tmp/x

How: the variant axes and attention block-size spaces live in ``kernels/dispatch.py`` (the one list the
launchers use).  For each variant this script calls the REAL launchers (``_attn_forward``,
``_attn_backward``, ``_embedding_forward``, ``_embedding_backward``, ``doc_positions_and_masks``) on
CPU tensors of the variant's shape while ``JITFunction.run`` is replaced by a recorder, so every kernel
launch -- including ones a future launcher adds -- is captured with the exact arguments, constexprs
and options it would be launched with.  Captures are specialised with Triton's own binder for the
target (as a GPU launch would be), identical specialisations are compiled once, and each is compiled
by ``triton.compile`` down to a cubin with the ptxas that ships in the triton wheel, in parallel
processes, into a FRESH ``TRITON_CACHE_DIR`` and with ``TRITON_INTERPRET`` and
``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS`` removed (a cached or interpreted kernel hides compile errors).

Writes the project's benchmark record (``kernels/bench/record.py``: device, commit, date, load, command, the goal
"every launched variant compiles" and whether it is met, and as figures one row per compiled kernel: registers,
spill stores/loads, shared memory, compile seconds, the variants that launch it) as
``compile_all-triton-<version>.json`` -- one per Triton release, a rerun replaces it -- with the same rows as
``.csv`` and a Markdown table ``.md`` beside it, into ``--out`` (default the results folder ``docs/bench``), each
to a temporary name then renamed.  Exit status 1 and one line per failure naming the variant when any kernel
fails to compile or needs more shared memory than the architecture has; 2 on bad arguments.
"""
from __future__ import annotations

import os
import sys
import tempfile

# Before anything imports triton: compile for real, into a fresh cache.
for _var in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"):
    os.environ.pop(_var, None)
if "--cache-dir" not in sys.argv:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-check-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (silences 3.9's warning)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402

from kernels.bench import record  # noqa: E402

# usable shared memory per block (bytes): A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Launch:
    fn: object            # the JITFunction
    args: tuple
    kwargs: dict
    variant: str          # human-readable variant that launched it


@dataclass
class Job:
    kernel: str
    arch: int
    spec: tuple           # dedupe key
    launch: Launch
    variants: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# capture: run the launchers with JITFunction.run replaced by a recorder
# ----------------------------------------------------------------------------------------------
_CAPTURED: List[Launch] = []
_CURRENT = [""]


@contextlib.contextmanager
def _recording():
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        _CAPTURED.append(Launch(self, args, kwargs, _CURRENT[0]))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real


def _selected(filt) -> bool:
    return any(f in _CURRENT[0] for f in filt)


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def _sbhd(B, S, H, D, dtype):
    """A [B, S, H, D] view of megatron's [S, B, H, D] memory layout (what layers.py passes)."""
    return torch.empty(S, B, H, D, dtype=dtype).transpose(0, 1)


def _attention_launches(arch: int, filt: str) -> None:
    from kernels import attention as A
    from kernels.dispatch import DETERMINISTIC, DTYPES, GQA_GROUPS, HEAD_DIMS, attention_space

    B, S, Hkv = 2, 2048, 2
    seg = torch.sort(torch.randint(0, 8, (B, S)), dim=1).values.to(torch.int32)
    for dtn in DTYPES:
        dtype = _dt(dtn)
        for D in HEAD_DIMS:
            for group in GQA_GROUPS:
                Hq = Hkv * group
                q, do = _sbhd(B, S, Hq, D, dtype), _sbhd(B, S, Hq, D, dtype)
                k, v = _sbhd(B, S, Hkv, D, dtype), _sbhd(B, S, Hkv, D, dtype)
                base = f"attention %s {dtn} D{D} gqa{group}"
                for i, cfg in enumerate(attention_space("fwd", arch, D, dtype)):
                    _CURRENT[0] = (base % "fwd") + f" cfg{i}"
                    if _selected(filt):
                        A._attn_forward(q, k, v, seg, 0.125, config=cfg)
                o = torch.empty(B, S, Hq, D, dtype=dtype)
                lse = torch.empty(B, Hq, S, dtype=torch.float32)
                for det in DETERMINISTIC:
                    for i, cfg in enumerate(attention_space("bwd", arch, D, dtype, det)):
                        _CURRENT[0] = (base % "bwd") + f" det{int(det)} cfg{i}"
                        if _selected(filt):
                            A._attn_backward(do, q, k, v, seg, o, lse, 0.125, deterministic=det, config=cfg)


def _embedding_launches(arch: int, filt: str) -> None:
    from kernels import embedding as E
    from kernels.dispatch import DETERMINISTIC, DTYPES, EMBED_LANGS, HIDDEN_SIZES

    V, N = 2048, 4096
    ids = torch.randint(0, 2 * V, (N,))
    for dtn in DTYPES:
        dtype = _dt(dtn)
        for H in HIDDEN_SIZES:
            w = torch.empty(V, H, dtype=dtype)
            g = torch.empty(N, H, dtype=dtype)
            for L in EMBED_LANGS:
                lid = torch.randint(0, L, (N,)) if L else None
                lw = torch.empty(L, H, dtype=dtype) if L else None
                _CURRENT[0] = f"embedding fwd {dtn} H{H} langs{L}"
                if _selected(filt):
                    E._embedding_forward(ids, w, V, lid, lw, 1.0, bool(L))
                for det in DETERMINISTIC:
                    _CURRENT[0] = f"embedding bwd {dtn} H{H} langs{L} det{int(det)}"
                    if _selected(filt):
                        E._embedding_backward(g, ids, (V, H), dtype, V, lid, (L, H), dtype, 1.0, True, bool(L), det)


def _doc_mask_launches(arch: int, filt: str) -> None:
    from kernels import doc_mask as M

    for S in (128, 2048):  # the presets' sequence lengths (tiny, qwen2-360m / llama3.2-1b)
        tokens = torch.randint(0, 100, (2, S))
        for pad in (None, 7):
            for eod_loss in (True, False):
                _CURRENT[0] = f"doc_mask S{S} pad{int(pad is not None)} eodloss{int(eod_loss)}"
                if _selected(filt):
                    M._doc_mask_launch(tokens, 0, pad, eod_loss)


OPS = {"attention": _attention_launches, "embedding": _embedding_launches, "doc_mask": _doc_mask_launches}


# The compilation knobs JITFunction.run hands its binder, by Triton release: 3.6 (the GPU image's) passes
# instrumentation_mode, 3.9 (CI's) adds fpsan_homomorphic_casts. Only those this Triton has are passed, so the
# check specialises each launch exactly as this Triton's own run would.
_BINDER_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")


def _binder_options():
    from triton import knobs

    opts = {"debug": False}
    for name in _BINDER_KNOBS:
        if hasattr(knobs.compilation, name):
            opts[name] = getattr(knobs.compilation, name)
    return opts


def _specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would build them for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = dict(launch.kwargs)
    for key, val in _binder_options().items():
        kw.setdefault(key, val)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kw)
    return launch.fn._pack_args(backend, kw, bound, spec, opts)


def collect(archs, ops, filt=("",)) -> List[Job]:
    jobs: Dict[tuple, Job] = {}
    for arch in archs:
        for op in ops:
            _CAPTURED.clear()
            with _recording():
                OPS[op](arch, filt)
            for launch in _CAPTURED:
                options, signature, constexprs, attrs = _specialise(launch, arch)
                name = launch.fn.__name__
                key = (name, arch, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
                       tuple(sorted((k, str(v)) for k, v in attrs.items())), str(options))
                job = jobs.setdefault(key, Job(name, arch, key, launch))
                if launch.variant not in job.variants:
                    job.variants.append(launch.variant)
    return list(jobs.values())


def _constexprs(job: Job) -> Dict[str, object]:
    names = [p.name for p in job.launch.fn.params]
    return {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v for k, v in job.spec[3]}


def _pointer_types(job: Job) -> Tuple[str, ...]:
    return tuple(str(t) for _, t in job.spec[2] if str(t).startswith("*"))


def representative(jobs: List[Job]) -> List[Job]:
    """One compile per code path: per kernel, arch, pointer dtypes and every non-integer constexpr (a flag or a
    precision: PREC, ATOMIC_DQ, HAS_PAD, DO_LANG, ...), plus, for each size ``X`` with a tile ``BLOCK_X``, whether
    the tile masks it (D=80 in BLOCK_D=128). Integer sizes and tiles alone do not change the code Triton's frontend
    sees, only its shapes; of a path's jobs the one with the largest tiles (the nearest the shared-memory limit)
    stays. The full check (every variant) stays the default: this is for a second Triton release."""
    best: Dict[tuple, Tuple[int, Job]] = {}
    for job in jobs:
        ce = _constexprs(job)
        flags = tuple(sorted((k, str(v)) for k, v in ce.items() if isinstance(v, bool) or not isinstance(v, int)))
        masks = tuple(sorted((k, ce[k] != ce[f"BLOCK_{k}"]) for k in ce
                             if f"BLOCK_{k}" in ce and not isinstance(ce[k], bool)))
        tiles = math.prod(v for k, v in ce.items()
                          if k.startswith("BLOCK") and isinstance(v, int) and not isinstance(v, bool))
        key = (job.kernel, job.arch, _pointer_types(job), flags, masks)
        if key not in best or tiles > best[key][0]:
            best[key] = (tiles, job)
    return [job for _, job in best.values()]


# ----------------------------------------------------------------------------------------------
# compile (worker processes; forked, so they inherit the captured launches)
# ----------------------------------------------------------------------------------------------
_JOBS: List[Job] = []
_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _describe(e: BaseException) -> str:
    """One line: where Triton's frontend stopped (source line) and the root cause's message."""
    where = ""
    lines = str(e).splitlines()
    if lines and lines[0].startswith("at ") and "^" in [ln.strip() for ln in lines]:
        caret = [ln.strip() for ln in lines].index("^")
        where = f" {lines[0].rstrip(':')} `{lines[caret - 1].strip()}`" if caret else ""
    chain, seen = [e], set()
    while chain[-1] is not None and id(chain[-1]) not in seen:
        seen.add(id(chain[-1]))
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    chain = [c for c in chain if c is not None]
    root = chain[-1]
    msg = getattr(root, "error_message", None) or next(
        (ln.strip() for ln in reversed(str(root).splitlines()) if ln.strip() and ln.strip() != "^"), "")
    return f"{type(e).__name__}{where}: {type(root).__name__}: {msg}"


def _compile_one(i: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[i]
    row = {"kernel": job.kernel, "arch": f"sm_{job.arch}"}
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        options, signature, constexprs, attrs = _specialise(job.launch, job.arch)
        src = ASTSource(job.launch.fn, signature, constexprs, attrs)
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills) is printed to stdout
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            kern = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options.__dict__)
        log = buf.getvalue()
        regs = _PTXAS_RE.findall(log)
        spills = _SPILL_RE.findall(log)
        row.update(status="ok", regs=int(regs[-1]) if regs else None,
                   spill_stores=int(spills[-1][0]) if spills else None,
                   spill_loads=int(spills[-1][1]) if spills else None,
                   smem=int(kern.metadata.shared), num_warps=int(kern.metadata.num_warps),
                   num_stages=int(kern.metadata.num_stages), has_cubin="cubin" in kern.asm)
        if not row["has_cubin"]:
            row["status"] = "error: no cubin produced"
        elif row["smem"] > SMEM_LIMIT[job.arch]:
            row["status"] = f"error: needs {row['smem']} B shared memory > {SMEM_LIMIT[job.arch]} on sm_{job.arch}"
    except Exception as e:  # noqa: BLE001 - reported per variant
        row.update(status=f"error: {_describe(e)}"[:400])
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["cpu_s"] = round(_cpu_seconds() - cpu0, 2)  # this process + its ptxas: independent of machine load
    names = [p.name for p in job.launch.fn.params]
    row["constexprs"] = " ".join(f"{names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k}={v}"
                                 for k, v in dict(job.spec[3]).items())
    row["variants"] = "; ".join(job.variants)
    return row


def compile_jobs(jobs: List[Job], workers: int) -> List[dict]:
    global _JOBS
    _JOBS = jobs
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].kernel.startswith("_attn") is False, i))
    rows = []

    def done(row):
        rows.append(row)
        print(f"[{len(rows)}/{len(jobs)}] {row['kernel']} {row['arch']} {row['compile_s']:.1f}s "
              f"regs={row.get('regs')} spills={row.get('spill_stores')} {row['status'][:100]}", flush=True)

    if workers <= 1:
        for i in order:
            done(_compile_one(i))
        return rows
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
        for fut in as_completed([ex.submit(_compile_one, i) for i in order]):
            done(fut.result())
    return rows


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------
COLUMNS = ["kernel", "arch", "constexprs", "num_warps", "num_stages", "regs", "spill_stores", "spill_loads",
           "smem", "compile_s", "cpu_s", "status", "variants"]


def tables(rows: List[dict], meta: dict) -> Tuple[List[dict], str, str]:
    """(rows sorted as stored, CSV text, Markdown text)."""
    rows = sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["constexprs"]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, "") if r.get(c) is not None else "" for c in COLUMNS])
    lines = [f"# Triton compile check: {meta['n_ok']}/{meta['n']} kernels compiled to cubin",
             "",
             f"`python -m kernels.bench.compile_all` -- triton {meta['triton']}, commit {meta['commit']}, "
             f"{meta['date']}, {meta['variants']} launched variants deduplicated to {meta['distinct']} compiles, "
             f"{meta['wall_s']:.0f} s wall with {meta['workers']} processes, {meta['cpu_s']:.0f} CPU-seconds of "
             f"compiling. Selection: {meta['selection']}.",
             "",
             "| " + " | ".join(COLUMNS[:-1]) + " | variants |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [str(r.get(c, "")) if r.get(c) is not None else "" for c in COLUMNS[:-1]]
        vs = r.get("variants", "").split("; ")
        cells.append(vs[0] + (f" (+{len(vs) - 1} more)" if len(vs) > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return rows, buf.getvalue(), "\n".join(lines) + "\n"


def compile_goal(n_ok: int, n: int, archs) -> dict:
    return record.goal(f"every launched kernel variant compiles to cubin for sm_{', sm_'.join(map(str, archs))} "
                       "(within the architecture's shared memory)", n_ok, "==", n, "compiles")


def write_tables(rows: List[dict], out: Path, meta: dict, run: record.Run) -> Path:
    """The record ``compile_all-triton-<version>.json`` with its ``.csv`` and ``.md`` beside it, in ``out``."""
    rows, csv_text, md_text = tables(rows, meta)
    figures = {k: meta[k] for k in ("triton", "archs", "selection", "variants", "wall_s", "workers", "cpu_s")}
    figures.update(compiles=meta["n"], compiled=meta["n_ok"],
                   rows=[{c: r.get(c) for c in COLUMNS} for r in rows])
    return run.write(record.cpu_device(), figures, [compile_goal(meta["n_ok"], meta["n"], meta["archs"])], out=out,
                     stem=f"compile_all-triton-{meta['triton']}", companions={".csv": csv_text, ".md": md_text},
                     environment={"triton": meta["triton"], "torch": torch.__version__})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", type=int, nargs="+", default=None, help="compute capabilities (default: 80 90)")
    p.add_argument("--only", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--filter", nargs="+", default=[""],
                   help="only variants whose name contains one of these texts (e.g. 'attention fwd bfloat16 D64')")
    p.add_argument("--representative", action="store_true",
                   help="compile one variant per code path (kernel, arch, dtypes, flags; the largest tiles) instead "
                        "of every variant: the check for a second Triton release")
    p.add_argument("--list", action="store_true",
                   help="print the distinct compiles (kernel, arch, constexprs, variants), one per line, and stop")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--out", type=Path, default=record.RESULTS_DIR,
                   help="results folder for compile_all-triton-<version>.{json,csv,md} (default docs/bench)")
    p.add_argument("--cache-dir", default=None, help="TRITON_CACHE_DIR to use instead of a fresh temp dir")
    args = p.parse_args(argv)
    from kernels.dispatch import ARCHS

    archs = args.archs or list(ARCHS)
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        print(f"compile_all: --archs {bad[0]}: expected one of {list(ARCHS)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"compile_all: --jobs {args.jobs}: expected >= 1", file=sys.stderr)
        return 2
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    import triton

    run = record.Run("compile_all", argv)
    t0 = time.perf_counter()
    try:
        jobs = collect(archs, args.only, args.filter)
    except Exception as e:  # noqa: BLE001 - a launcher that cannot even be called on CPU tensors
        print(f"FAILED capturing variant [{_CURRENT[0]}]: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    if not jobs:
        print(f"compile_all: --filter {' '.join(args.filter)!r} selects no variant", file=sys.stderr)
        return 2
    n_variants = len({v for j in jobs for v in j.variants})
    n_all = len(jobs)
    if args.representative:
        jobs = representative(jobs)
    if args.list:
        for job in sorted(jobs, key=lambda j: (j.kernel, j.arch, str(j.spec))):
            ce = " ".join(f"{k}={v}" for k, v in _constexprs(job).items())
            print(f"{job.kernel} sm_{job.arch} {ce} | {','.join(_pointer_types(job))} | {'; '.join(job.variants)}")
        return 0
    print(f"# {n_variants} variants -> {n_all} distinct compiles"
          + (f", {len(jobs)} of them representative (one per code path)" if args.representative else "")
          + f" over sm_{', sm_'.join(map(str, archs))}; "
          f"{args.jobs} processes; cache {os.environ['TRITON_CACHE_DIR']}", flush=True)
    rows = compile_jobs(jobs, args.jobs)
    wall = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] != "ok"]
    meta = dict(n=len(rows), distinct=n_all, n_ok=len(rows) - len(failed), triton=triton.__version__, commit=run.commit,
                date=run.date, variants=n_variants, archs=archs,
                wall_s=wall, workers=args.jobs, cpu_s=sum(r["cpu_s"] for r in rows),
                selection=f"archs {archs}, ops {args.only}" + (
                    f", filter {args.filter}" if args.filter != [""] else " (everything)") + (
                    f"; representative: {len(jobs)} of the {n_all} distinct compiles, one per code path "
                    "(kernel, arch, dtypes, flags, masked sizes; the largest tiles)" if args.representative else ""))
    json_path = write_tables(rows, args.out, meta, run)
    spilling = [r for r in rows if r["status"] == "ok" and (r.get("spill_stores") or 0) > 0]
    print(f"# {meta['n_ok']}/{meta['n']} compiled in {wall:.0f} s wall, {meta['cpu_s']:.0f} CPU-s; "
          f"{len(spilling)} of them spill registers; "
          f"wrote {json_path} (+ .csv, .md)")
    for r in failed:
        print(f"FAILED {r['kernel']} {r['arch']} [{r['variants'].split('; ')[0]}"
              f"{' +%d more variants' % (r['variants'].count('; ')) if '; ' in r['variants'] else ''}]: "
              f"{r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
