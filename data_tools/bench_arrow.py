"""Parquet / Arrow / save_to_disk inputs beside the JSONL of the same units (data_tools/arrow_inputs.py):

    python -m data_tools.bench_arrow                       # 20k utterances of 50-400 units, median of 5
    python -m data_tools.bench_arrow --sequences 2000 --repeats 1

The units are ``bench_build.generate``'s (the JSONL as ``json.dumps`` writes it); the same rows go to a parquet
file (``pyarrow.parquet.write_table``, its default row groups), an Arrow IPC stream and a save_to_disk folder
(what ``datasets`` writes). Each input is built by ``bench_build.ours_in_subprocess`` (a fresh interpreter,
timed as the CLI runs it, 1 worker); the outputs must be byte-identical (else exit 1). Prints units/s per input and
writes the benchmark record (``kernels/bench/record.py``) ``bench_arrow-cpu-<date>.json`` into the results folder
(``--out``; default docs/bench), with the goal that each table input builds at least as fast as the JSONL of the
same units.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from data_tools.bench_build import generate_in_subprocess, ours_in_subprocess, same
from kernels.bench.record import Run, cpu_device, goal


def write_tables(jsonl: str, d: str) -> dict:
    """The JSONL's rows as parquet, an Arrow IPC stream and a save_to_disk folder (file_name, units, lang)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(jsonl)]
    units = [r["units"] for r in rows]
    table = pa.table({"file_name": [r["file_name"] for r in rows],
                      "units": pa.array(units, pa.list_(pa.int16())), "lang": [r["lang"] for r in rows]})
    paths = {"parquet": os.path.join(d, "utt.parquet"), "arrow": os.path.join(d, "utt.arrow"),
             "save_to_disk": os.path.join(d, "utt_ds")}
    pq.write_table(table, paths["parquet"])
    os.makedirs(paths["save_to_disk"])
    for path in (paths["arrow"], os.path.join(paths["save_to_disk"], "data-00000-of-00001.arrow")):
        with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table, max_chunksize=1000)        # datasets writes record batches of 1,000 rows
    with open(os.path.join(paths["save_to_disk"], "state.json"), "w") as f:
        f.write(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with open(os.path.join(paths["save_to_disk"], "dataset_info.json"), "w") as f:
        f.write(json.dumps({"features": {}}))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.bench_arrow", description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None,
                    help="results folder, or a .json file path (default: the results folder docs/bench)")
    a = ap.parse_args(argv)
    run = Run("bench_arrow", argv, prog="python -m data_tools.bench_arrow")
    with tempfile.TemporaryDirectory() as d:
        paths = generate_in_subprocess(d, a.sequences, 50, 400)
        units = int(np.load(paths["npy"], mmap_mode="r").shape[0])
        inputs = {"jsonl": paths["jsonl"], **write_tables(paths["jsonl"], d)}
        out = {"sequences": a.sequences, "units": units, "repeats": a.repeats,
               "timing": "wall and CPU time of the CLI build in a fresh interpreter, 1 worker, median of repeats"}
        for fmt, path in inputs.items():
            wall, cpu = ours_in_subprocess(path, os.path.join(d, f"o_{fmt}"), 1, a.repeats)
            out[fmt] = {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4), "units_per_s": round(units / wall),
                        "units_per_cpu_s": round(units / cpu) if cpu else None}
            if fmt != "jsonl" and not same(os.path.join(d, "o_jsonl"), os.path.join(d, f"o_{fmt}")):
                print(f"error: {fmt}: output differs from the JSONL build's", file=sys.stderr)
                return 1
    print(json.dumps(out, indent=2))
    goals = [goal(f"{fmt} build vs the JSONL of the same units: units per CPU-second ratio",
                  round(out[fmt]["units_per_cpu_s"] / out["jsonl"]["units_per_cpu_s"], 2)
                  if out[fmt]["units_per_cpu_s"] and out["jsonl"]["units_per_cpu_s"] else None, ">=", 1.0, "x")
             for fmt in inputs if fmt != "jsonl"]
    path = run.write(cpu_device(), out, goals, out=a.out, environment={"numpy": np.__version__})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
