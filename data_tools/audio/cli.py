"""argparse setup of the audio commands of ``python -m data_tools`` (registered from data_tools/cli.py)."""
from __future__ import annotations

import argparse
import json
from typing import List

from megaslm.progress import add_progress_option

from data_tools.errors import DataError


def _tokenizer_args(p: argparse.ArgumentParser, kmeans: bool = True) -> None:
    g = p.add_argument_group("tokeniser (local model folders only)")
    g.add_argument("--tokenizer", choices=["mimi", "hubert"], required=True)
    g.add_argument("--model-dir", required=True, help="local folder with config.json + weights (save_pretrained)")
    g.add_argument("--layer", type=int, default=None, help="hubert: features of this transformer layer (1-based)")
    if kmeans:
        g.add_argument("--kmeans", default=None, help="hubert: the (K, hidden) centroid .npy")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if a GPU is there, else cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")


def _input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--manifest", help="CSV (header: path[,id,lang,story,sentence]) or JSONL with those keys")
    g.add_argument("--folder", help="every .wav/.flac/.mp3/.ogg/.opus under this folder (sorted)")
    p.add_argument("--lang", default="en", help="language of rows without one (default en)")
    p.add_argument("--channel", type=int, default=None, help="take this channel instead of mixing to mono")


def _entries(a):
    from data_tools.audio.manifest import read_manifest, scan_folder
    return read_manifest(a.manifest, a.lang) if a.manifest else scan_folder(a.folder, a.lang)


def _device(a):
    import os
    if a.device:
        return a.device
    import torch
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _load(a):
    from data_tools.audio.tokenizers import check_tokenizer, load_tokenizer
    check_tokenizer(a.tokenizer, a.model_dir, a.layer, getattr(a, "kmeans", None))   # before torch's import (_device)
    return load_tokenizer(a.tokenizer, a.model_dir, a.layer, getattr(a, "kmeans", None), _device(a), a.dtype)


def cmd_tokenize(a) -> int:
    from data_tools.audio.run import TokenizeOptions, tokenize
    if not a.output.endswith(".jsonl"):
        raise DataError(f"--output {a.output}: expected a .jsonl path (the utterance / story JSONL `build` reads)")
    for k in ("shard_size", "batch_size"):
        if getattr(a, k) < 1:
            raise DataError(f"--{k.replace('_', '-')}: expected a positive integer")
    entries = _entries(a)
    tok = _load(a)
    side = tokenize(entries, tok, TokenizeOptions(output=a.output, shard_size=a.shard_size, batch_size=a.batch_size,
                                                  batch_seconds=a.batch_seconds, dedup=a.dedup, channel=a.channel,
                                                  skip_bad=a.skip_bad, progress=not a.quiet))
    if side is not None:
        print(f"wrote {a.output} ({side['kind']}: {side['records']:,} records, {side['hours']:.4f} h, "
              f"{side['frames']:,} frames; units {side['unit_source']})"
              + (f"; {side['quarantine']['count']} bad -> {side['quarantine']['report']}"
                 if side["quarantine"]["count"] else ""))
    return 0


def cmd_kmeans(a) -> int:
    from data_tools.audio.kmeans import train_kmeans
    if a.tokenizer != "hubert":
        raise DataError("tokenize-kmeans-train: only --tokenizer hubert has a k-means codebook (Mimi's is built in)")
    tok = _load(a)
    r = train_kmeans(_entries(a), tok, a.clusters, a.output, a.max_files, a.max_frames, a.seed, a.batch_size,
                     a.channel, not a.quiet)
    print(json.dumps(r))
    return 0


def cmd_bench(a) -> int:
    from data_tools.audio.eval_sets import convert_benchmark
    r = convert_benchmark(a.kind, a.root, a.output, _load(a), like=a.like, languages=a.languages,
                          batch_size=a.batch_size, progress=not a.quiet)
    print(json.dumps(r))
    return 0


def register_audio(sub) -> None:
    t = sub.add_parser("tokenize", help="audio files -> unit JSONL (Mimi / HuBERT+k-means), sharded and resumable",
                       description="Run under torchrun / deepspeed for several ranks (docs/audio.md).")
    _input_args(t)
    _tokenizer_args(t)
    t.add_argument("--output", "-o", required=True, help="OUT.jsonl (+ OUT.units.json, OUT.jsonl.work/)")
    t.add_argument("--dedup", action="store_true", help="collapse repeated units, with `duration` run lengths")
    t.add_argument("--shard-size", type=int, default=256, help="files per shard (the unit of rank assignment)")
    t.add_argument("--batch-size", type=int, default=16, help="files per forward pass")
    t.add_argument("--batch-seconds", type=float, default=600.0, help="padded audio seconds per forward pass")
    t.add_argument("--skip-bad", action="store_true", help="quarantine bad files (OUT.quarantine.jsonl)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress (bar or lines)")
    add_progress_option(t)
    t.set_defaults(audio_cmd=cmd_tokenize)

    k = sub.add_parser("tokenize-kmeans-train", help="fit the HuBERT unit codebook (MiniBatchKMeans) -> .npy")
    _input_args(k)
    _tokenizer_args(k, kmeans=False)
    k.add_argument("--clusters", type=int, default=500)
    k.add_argument("--output", "-o", required=True, help="codebook .npy")
    k.add_argument("--max-files", type=int, default=1000, help="random sample of this many files (seeded)")
    k.add_argument("--max-frames", type=int, default=1_000_000)
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--quiet", "-q", action="store_true", help="no progress (bar or lines)")
    add_progress_option(k)
    k.set_defaults(audio_cmd=cmd_kmeans)

    b = sub.add_parser("tokenize-bench", help="spoken benchmark audio (sSC/sTC/sWUGGY/sBLIMP) -> evals JSONL")
    b.add_argument("kind", choices=["storycloze", "topiccloze", "swuggy", "sblimp"])
    b.add_argument("root", help="the benchmark's audio folder (layouts: docs/audio.md)")
    _tokenizer_args(b)
    b.add_argument("--output", "-o", required=True, help="benchmark folder (manifest.json + <kind>.jsonl)")
    b.add_argument("--like", required=True, metavar="PREFIX",
                   help="the training data: a built dataset prefix; the benchmark gets its manifest's vocabulary "
                        "and is refused unless this tokeniser made that data")
    b.add_argument("--languages", default=None, help="languages to convert (default: all found)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--quiet", "-q", action="store_true", help="no progress (bar or lines)")
    add_progress_option(b)
    b.set_defaults(audio_cmd=cmd_bench)


def run_audio(a) -> int:
    return a.audio_cmd(a)


__all__: List[str] = ["register_audio", "run_audio"]
