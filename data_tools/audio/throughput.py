"""Tokenisation throughput benchmark (a script, not a test): hours of audio per second per device.

    python -m data_tools.audio.throughput --tokenizer mimi --model-dir MIMI_DIR      # -> docs/bench/
    python -m data_tools.audio.throughput --tokenizer mimi --random-init --minutes 10 --out /tmp/tp.json

``--random-init`` builds the model from its DEFAULT transformers config (full-size Mimi / HuBERT base)
with random weights: the compute is that of the real checkpoint, so the speed is representative without
downloading anything (units are meaningless). Audio: synthetic utterances of 2-20 s (uniform, seeded) at the
tokeniser's sample rate, already in memory, so the figure is the model's (file decoding and resampling
run in a background thread in ``tokenize`` and are excluded here). Batches are length-sorted as in
``tokenize``. Prints the figures and stores the project's benchmark record (kernels/bench/record.py: device,
commit, date, load, command, figures; no speed goal is set yet) in the results folder ``docs/bench/`` as
``tokenize_throughput-<device>-<date>.json``, or at ``--out`` (a folder or a ``.json`` path). Speed targets
are judged from these records, never by timed assertions in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from kernels.bench.record import Run, cpu_device


def _device_name(dev: str) -> str:
    import torch
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    return cpu_device()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", choices=["mimi", "hubert"], required=True)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--random-init", action="store_true", help="full-size default config, random weights")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=10.0, help="audio minutes to tokenise (after a warm-up)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder, or a .json file path (default docs/bench)")
    a = ap.parse_args(argv)
    run = Run("tokenize_throughput", argv, prog="python -m data_tools.audio.throughput")
    import torch

    from data_tools.audio.tokenizers import load_tokenizer
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="tp_")
    model_dir, kmeans = a.model_dir, None
    if a.random_init:
        torch.manual_seed(a.seed)
        if a.tokenizer == "mimi":
            from transformers import MimiConfig, MimiModel
            MimiModel(MimiConfig()).save_pretrained(tmp)
        else:
            from transformers import HubertConfig, HubertModel
            HubertModel(HubertConfig()).save_pretrained(tmp)
        model_dir = tmp
    elif not model_dir:
        ap.error("--model-dir or --random-init")
    if a.tokenizer == "hubert":
        from transformers import AutoConfig
        hidden = AutoConfig.from_pretrained(model_dir, local_files_only=True).hidden_size
        kmeans = os.path.join(tmp, "km.npy")
        np.save(kmeans, np.random.RandomState(a.seed).randn(a.clusters, hidden).astype(np.float32))
    tok = load_tokenizer(a.tokenizer, model_dir, a.layer if a.tokenizer == "hubert" else None, kmeans, dev, a.dtype)
    rs = np.random.RandomState(a.seed)
    total, waves = 0.0, []
    while total < a.minutes * 60:
        s = rs.uniform(2, 20)
        waves.append((0.1 * rs.randn(int(s * tok.sample_rate))).astype(np.float32))
        total += s
    waves.sort(key=len, reverse=True)
    batches = [waves[i:i + a.batch_size] for i in range(0, len(waves), a.batch_size)]

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    tok.encode_batch(batches[-1])        # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    frames = 0
    for b in batches:
        frames += sum(len(u) for u in tok.encode_batch(b))
    sync()
    dt = time.perf_counter() - t0
    res = {"tokenizer": a.tokenizer, "unit_source": tok.unit_source, "random_init": a.random_init,
           "dtype": str(tok.dtype), "batch_size": a.batch_size, "files": len(waves),
           "audio_hours": total / 3600, "frames": frames, "wall_s": dt,
           "hours_per_second_per_device": total / 3600 / dt, "realtime_factor": total / dt}
    print(json.dumps(res, indent=1))
    path = run.write(_device_name(dev), res, out=a.out, environment={"torch": torch.__version__})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
