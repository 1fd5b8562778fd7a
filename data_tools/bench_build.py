"""Data-build benchmark (issue 14 item 4): megatron-core's per-item builder loop vs ``data_tools build``.

    python -m data_tools.bench_build                 # 20k sequences of 50-400 units, workers 1 and 2
    python -m data_tools.bench_build --sequences 2000 --repeats 1 --scale 2 --out /tmp/b.json   # quick look

Generates the input (utterance JSONL as ``json.dumps`` writes it, ``.npy`` + ``.bounds.jsonl``, ``.npz``),
runs the anchor a user would write -- a Python loop of ``IndexedDatasetBuilder.add_item`` +
``end_document`` per record (``json.loads`` per line for JSONL and for the .npy sidecar) -- and
``build_dataset`` (what ``python -m data_tools build`` runs) on the same input, checks that the anchor's
``.bin``/``.idx`` and ours are byte-identical (and ours identical across worker counts), then prints and
stores units/s and the ratio. Times are wall times of the build call alone (interpreter start, and the
anchor's megatron-core/torch import, are paid before timing; ``build`` imports neither), median of
``--repeats``, each repeat building into a fresh prefix. Each side runs in a fresh child interpreter per
format and worker count, timed in there: the anchor needs torch, and ``build`` is timed as the CLI runs it
(glibc's malloc set as the CLI sets it, ``common.keep_freed_memory``; no heap left by earlier builds;
pools fork a small process). The input is generated in a child too. CPU seconds (the process and the workers
it waited for) are recorded beside wall seconds: on a shared machine they show the work done, where wall
time also shows the wait for a core. The JSON records the load average before and after the run. Beside
them, the I/O floor: reading the input files whole and writing the output's bytes to two new files, the
least a build of that input can take on this machine's page cache ("disk speed").

The record (``kernels/bench/record.py``: device, commit, date, load before and after, command, the goals of
issue 14 item 4 and whether they are met, the figures) goes to the results folder ``docs/bench/`` as
``bench_build-<device>-<date>.json``, or to ``--out`` (a folder, or a ``.json`` file path).

Worker scaling is measured on a second input ``--scale`` times larger (default 10x: 200k sequences), where
process start-up does not dominate: ``build`` with 1 worker vs each count in ``--workers`` on that input
(outputs byte-identical), reported as speed-up vs 1 worker, with the cores the build kept busy (CPU seconds /
wall seconds) and its units per CPU-second: one worker already keeps more than one core busy on .npy/.npz
(its writer thread appends and hashes while it converts), so on a 2-core machine the cores-busy figure shows
how much of the speed-up was left to take.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from kernels.bench.record import Run, cpu_device, goal
from megaslm.vocab import UnitVocab

CODEBOOK = 2048


def generate(d: str, n: int, lo: int, hi: int, seed: int = 0) -> Dict[str, str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    units = rng.integers(0, CODEBOOK, size=int(lengths.sum()), dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    paths = {"jsonl": os.path.join(d, "utt.jsonl"), "npy": os.path.join(d, "utt.npy"),
             "npz": os.path.join(d, "utt.npz")}
    with open(paths["jsonl"], "w") as f:
        for i in range(n):
            f.write(json.dumps({"file_name": f"spk{i % 50}/utt{i:06d}.flac",
                                "units": units[offsets[i]:offsets[i + 1]].tolist(), "lang": "en"}) + "\n")
    np.save(paths["npy"], units)
    with open(os.path.join(d, "utt.bounds.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"utt{i:06d}", "start": int(offsets[i]), "end": int(offsets[i + 1]),
                                "lang": "en"}) + "\n")
    np.savez(paths["npz"], units=units, offsets=offsets)
    return paths


def generate_in_subprocess(d: str, n: int, lo: int, hi: int, seed: int = 0) -> Dict[str, str]:
    """``generate`` in a child interpreter. Generating 200k JSON lines leaves this process a heap of
    hundreds of MB (glibc keeps freed memory, see common.keep_freed_memory); a pool then forks that heap,
    and every page the parent or a worker writes afterwards is a copy-on-write fault. A CLI build starts
    from a fresh process, so the benchmark must too: measured, 2 workers on the 10x .npz input took 194 ms
    after an in-process generate and 143 ms from a fresh process."""
    code = ("import json, sys; from data_tools.bench_build import generate; "
            f"print(json.dumps(generate({d!r}, {n}, {lo}, {hi}, seed={seed})))")
    return _run_child(code)


def _run_child(code: str):
    """Run ``code`` in a child interpreter that imports this checkout; its last stdout line, as JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"benchmark child failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def anchor(fmt: str, path: str, prefix: str, vocab: UnitVocab) -> None:
    """The per-item loop over megatron-core's builder: one document per utterance, units + offset, eod."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab.size))
    eod = torch.tensor([vocab.eod_id])

    def add(units):
        builder.add_item(torch.cat([torch.as_tensor(units, dtype=torch.int64) + vocab.offset, eod]))
        builder.end_document()

    import warnings
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")   # memmap slices
    if fmt == "jsonl":
        with open(path) as f:
            for line in f:
                add(json.loads(line)["units"])
    elif fmt == "npy":
        arr = np.load(path, mmap_mode="r")
        with open(path[:-4] + ".bounds.jsonl") as f:
            for line in f:
                b = json.loads(line)
                add(np.asarray(arr[b["start"]:b["end"]]))
    else:
        with np.load(path) as z:
            units, off = z["units"], z["offsets"]
        for i in range(len(off) - 1):
            add(units[off[i]:off[i + 1]])
    builder.finalize(prefix + ".idx")


def anchor_in_subprocess(fmt: str, path: str, prefix: str, repeats: int):
    """The anchor runs in its own interpreter (it needs torch): this process must not hold torch when
    ``build`` forks its workers, as in the CLI. Returns the median (wall, CPU) seconds measured in there."""
    code = ("import json, sys; from data_tools.bench_build import anchor, median_run, CODEBOOK; "
            "from megaslm.vocab import UnitVocab; "
            f"print(json.dumps(median_run({repeats}, {prefix!r}, anchor, {fmt!r}, {path!r}, {prefix!r}, "
            "UnitVocab(codebook_size=CODEBOOK))))")
    return tuple(_run_child(code))


def ours(path: str, prefix: str, vocab: UnitVocab, workers: int) -> None:
    from data_tools.build import build_dataset
    build_dataset([path], prefix, vocab=vocab, mode="mono", lang="en", workers=workers, progress=False)


def ours_in_subprocess(path: str, prefix: str, workers: int, repeats: int):
    """``data_tools build`` timed as the CLI runs it: in a fresh interpreter that sets glibc's malloc as the
    CLI does (common.keep_freed_memory) and imports the build before timing. Measured in this process
    instead, a build ran ~10% slower after the earlier formats' builds had filled its heap (.npy: 231M units/s
    after the JSONL builds, 256M alone), and a pool forked that heap. Returns median (wall, CPU) seconds."""
    code = ("import json; from data_tools.common import keep_freed_memory; keep_freed_memory(); "
            "import data_tools.build; from data_tools.bench_build import median_run, ours, CODEBOOK; "
            "from megaslm.vocab import UnitVocab; "
            f"print(json.dumps(median_run({repeats}, {prefix!r}, ours, {path!r}, {prefix!r}, "
            f"UnitVocab(codebook_size=CODEBOOK), {workers})))")
    return tuple(_run_child(code))


def io_floor(inputs, out_prefix: str, out_bytes: int, repeats: int) -> float:
    """Median seconds to read ``inputs`` whole (into a reused buffer) and write ``out_bytes`` to two new
    files (tokens and language channel, as a build does): the least any build of this input can take on
    this machine's page cache, i.e. the build's "disk speed"."""
    buf = bytearray(1 << 22)
    data = bytes(len(buf))
    times = []
    for _ in range(repeats):
        for ext in (".floor.bin", ".floor.lang.bin"):
            if os.path.exists(out_prefix + ext):
                os.remove(out_prefix + ext)
        t = time.perf_counter()
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        for ext, n in ((".floor.bin", out_bytes * 2 // 3), (".floor.lang.bin", out_bytes - out_bytes * 2 // 3)):
            with open(out_prefix + ext, "wb", buffering=0) as f:
                while n > 0:
                    n -= f.write(data[:min(n, len(data))])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process and of the worker processes it waited for)."""
    import resource

    def cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    c0, t = cpu(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - t, cpu() - c0


def remove_outputs(prefix: str) -> None:
    """Delete what a build wrote at ``prefix`` (tokens, language channel, manifest)."""
    import glob
    for f in glob.glob(glob.escape(prefix) + ".*"):
        if os.path.isfile(f):
            os.remove(f)


def median_run(repeats: int, prefix: str, fn, *args):
    """Median (wall, CPU) seconds of ``fn(*args)`` over ``repeats`` runs, each building into a fresh
    ``prefix`` (what the previous run wrote there is deleted first, untimed): replacing an existing dataset
    also frees the old files' pages (here ~1 ms per MB), a cost of the file system, not of the build."""
    runs = []
    for _ in range(repeats):
        remove_outputs(prefix)
        # no dirty pages left for the kernel's flusher threads to write back while a build is timed: the
        # generated input (~1.3 GB with the 10x input) and earlier builds' outputs
        os.sync()
        runs.append(timed(fn, *args))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def same(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


# issue 14 item 4, one worker: (format, figure, target, unit)
GOALS = [("jsonl", "units_per_s", 20e6, "units/s"), ("jsonl", "ratio_vs_anchor", 5.0, "x megatron-core's loop"),
         ("npy", "units_per_s", 250e6, "units/s"), ("npz", "units_per_s", 250e6, "units/s")]


def goals(results: List[Dict]) -> List[dict]:
    """The goals the measured formats can judge, on the one-worker build."""
    by_fmt = {r["format"]: r for r in results}
    return [goal(f"{fmt} build, 1 worker: {key}", (by_fmt[fmt]["workers"].get("1") or {}).get(key), ">=",
                        target, unit) for fmt, key, target, unit in GOALS if fmt in by_fmt]


class OutputsDiffer(RuntimeError):
    """A build's output is not what it must equal (the anchor's, or the one-worker build's)."""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m data_tools.bench_build", description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--formats", default="jsonl,npy,npz")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--scale", type=int, default=10,
                    help="worker scaling is measured on an input this many times larger (0: skip)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--out", default=None,
                    help="results folder, or a .json file path (default: the results folder docs/bench)")
    return ap.parse_args(argv)


def make_inputs(a, work: str, workers: List[int]):
    """The input in every format, and (when a worker count other than 1 is measured) the ``--scale`` times
    larger one: (paths, units, big paths, big units)."""
    paths = generate_in_subprocess(work, a.sequences, a.min_len, a.max_len)
    units = int(np.load(paths["npy"], mmap_mode="r").shape[0])
    big_paths, big_units = {}, 0
    if a.scale and any(w != 1 for w in workers):
        big_dir = os.path.join(work, "big")
        os.makedirs(big_dir, exist_ok=True)
        big_paths = generate_in_subprocess(big_dir, a.sequences * a.scale, a.min_len, a.max_len, seed=1)
        big_units = int(np.load(big_paths["npy"], mmap_mode="r").shape[0])
    return paths, units, big_paths, big_units


def measure_format(a, fmt: str, path: str, units: int, work: str, workers: List[int]) -> Dict:
    """One format: the anchor, the I/O floor, then ``build`` at each worker count (byte-identical to the
    anchor, else ``OutputsDiffer``); its row of the record, without the scaling."""
    ref = os.path.join(work, f"anchor_{fmt}")
    t_anchor, c_anchor = anchor_in_subprocess(fmt, path, ref, a.repeats)
    out_bytes = os.path.getsize(ref + ".bin") * 3 // 2   # uint16 tokens + one language byte per token
    floor_inputs = [path] + ([path[:-4] + ".bounds.jsonl"] if fmt == "npy" else [])
    t_floor = io_floor(floor_inputs, os.path.join(work, "floor"), out_bytes, a.repeats)
    print(f"{fmt:5s} I/O floor (read the input, write {out_bytes / 1e6:.1f} MB): {t_floor * 1e3:.1f} ms = "
          f"{units / t_floor / 1e6:.0f} M units/s")
    row = {"format": fmt, "units": units, "sequences": a.sequences, "io_floor_s": t_floor,
           "io_floor_units_per_s": units / t_floor, "anchor_s": t_anchor,
           "anchor_units_per_s": units / t_anchor, "anchor_cpu_s": c_anchor,
           "anchor_units_per_cpu_s": units / c_anchor, "workers": {}}
    for w in workers:
        out = os.path.join(work, f"ours_{fmt}_w{w}")
        t, c = ours_in_subprocess(path, out, w, a.repeats)
        ident = same(ref, out)
        # CPU: the child that times the build never holds torch, so its worker processes are forked
        # children (joined: getrusage counts them) and its converter threads are its own
        row["workers"][str(w)] = {"s": t, "units_per_s": units / t, "ratio_vs_anchor": t_anchor / t,
                                  "times_io_floor": t / t_floor,
                                  "cpu_s": c, "units_per_cpu_s": units / c,
                                  "cpu_ratio_vs_anchor": c_anchor / c,
                                  "byte_identical_to_anchor": ident}
        cpu_txt = (f"per CPU-second: anchor {units / c_anchor / 1e6:6.2f} M, ours {units / c / 1e6:7.2f} M "
                   f"({c_anchor / c:5.1f}x)")
        print(f"{fmt:5s} anchor {units / t_anchor / 1e6:7.2f} M units/s | data_tools workers={w} "
              f"{units / t / 1e6:8.2f} M units/s ({t_anchor / t:5.1f}x; {t / t_floor:4.1f}x the I/O floor) | "
              f"{cpu_txt} | byte-identical: {ident}")
        if not ident:
            raise OutputsDiffer(f"outputs differ: {ref} vs {out}")
    w1 = row["workers"].get("1")
    for w in workers:
        if w1 and w != 1:
            row["workers"][str(w)]["speedup_vs_1_worker"] = w1["s"] / row["workers"][str(w)]["s"]
    return row


def measure_scaling(a, fmt: str, bpath: str, bunits: int, work: str, workers: List[int]) -> Dict:
    """``build`` on the larger input with 1 worker and each of ``workers`` (identical outputs, else
    ``OutputsDiffer``): speed-up vs 1 worker and the cores it kept busy."""
    scaling = {"units": bunits, "sequences": a.sequences * a.scale, "workers": {}}
    for w in sorted(set([1] + workers)):
        out = os.path.join(work, f"big_{fmt}_w{w}")
        t, c = ours_in_subprocess(bpath, out, w, a.repeats)
        ident = w == 1 or same(os.path.join(work, f"big_{fmt}_w1"), out)
        scaling["workers"][str(w)] = {"s": t, "units_per_s": bunits / t, "cpu_s": c,
                                      "units_per_cpu_s": bunits / c, "cores_busy": c / t,
                                      "identical_to_1_worker": ident}
        if not ident:
            raise OutputsDiffer(f"{a.scale}x input: workers={w} differs from 1 worker")
    for w, r in scaling["workers"].items():
        r["speedup_vs_1_worker"] = scaling["workers"]["1"]["s"] / r["s"]
        print(f"{fmt:5s} {a.scale}x input ({bunits:,} units) workers={w} {r['units_per_s'] / 1e6:8.2f} M "
              f"units/s, speed-up vs 1 worker {r['speedup_vs_1_worker']:.2f}x, cores busy "
              f"{r['cores_busy']:.2f} of {os.cpu_count()}, {r['units_per_cpu_s'] / 1e6:.0f} M units per "
              f"CPU-second, identical: {r['identical_to_1_worker']}")
    return scaling


def main(argv=None) -> int:
    a = parse_args(argv)
    run = Run("bench_build", argv, prog="python -m data_tools.bench_build")
    device = cpu_device()
    workers = [int(w) for w in a.workers.split(",")]
    work = a.dir or tempfile.mkdtemp(prefix="bench_build_")
    os.makedirs(work, exist_ok=True)
    try:
        paths, units, big_paths, big_units = make_inputs(a, work, workers)
        results: List[Dict] = []
        print(f"{a.sequences} sequences, {units:,} units; {device}, load {run.load_before}; median of {a.repeats}")
        for fmt in a.formats.split(","):
            row = measure_format(a, fmt, paths[fmt], units, work, workers)
            if big_paths:
                row["scaling"] = measure_scaling(a, fmt, big_paths[fmt], big_units, work, workers)
            results.append(row)
        figures = {"timing": "in-process wall time of the build call (and CPU time of it and its worker "
                             "processes), median of repeats", "repeats": a.repeats, "scale": a.scale,
                   "results": results}
        path = run.write(device, figures, goals(results), out=a.out,
                         environment={"numpy": np.__version__, "cpu_count": os.cpu_count()})
        print(f"wrote {path}")
        return 0
    except OutputsDiffer as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
