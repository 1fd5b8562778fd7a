"""Parquet / Arrow / save_to_disk inputs beside the JSONL of the same units (data_tools/arrow_inputs.py):

    python -m data_tools.bench_arrow                       # 20k utterances of 50-400 units, median of 5
    python -m data_tools.bench_arrow --sequences 2000 --repeats 1

The units are ``bench_build.generate``'s (the JSONL as ``json.dumps`` writes it); the same rows go to a parquet
file (``pyarrow.parquet.write_table``, its default row groups), an Arrow IPC stream and a save_to_disk folder
(what ``datasets`` writes). Each input is built by ``bench_build.ours_in_subprocess`` (a fresh interpreter,
timed as the CLI runs it, 1 worker); the outputs must be byte-identical. Prints units/s per input as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from data_tools.bench_build import generate_in_subprocess, ours_in_subprocess, same


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
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}, f)
    with open(os.path.join(paths["save_to_disk"], "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        paths = generate_in_subprocess(d, a.sequences, 50, 400)
        units = int(np.load(paths["npy"], mmap_mode="r").shape[0])
        inputs = {"jsonl": paths["jsonl"], **write_tables(paths["jsonl"], d)}
        out = {"sequences": a.sequences, "units": units, "repeats": a.repeats}
        for fmt, path in inputs.items():
            wall, cpu = ours_in_subprocess(path, os.path.join(d, f"o_{fmt}"), 1, a.repeats)
            out[fmt] = {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4), "units_per_s": round(units / wall)}
            if fmt != "jsonl" and not same(os.path.join(d, "o_jsonl"), os.path.join(d, f"o_{fmt}")):
                raise SystemExit(f"{fmt}: output differs from the JSONL build's")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
