"""A self-contained audio playground (what docs/audio.md's commands run on), no downloads:

    python -m data_tools.audio.demo runs/audio_demo

writes tiny RANDOM-weight Mimi and HuBERT model folders (from their transformers configs: the real
architectures, 1-2 layers, narrow; units are meaningless but every code path is the real one), synthetic
audio (tones + noise at 16/22.05/24/44.1 kHz, some stereo) with a CSV manifest of utterances, a JSONL
manifest of EN-FR parallel stories (one file per sentence), and a spoken-StoryCloze-layout folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def make_mimi(path: str, seed: int = 0) -> str:
    import torch
    from transformers import MimiConfig, MimiModel
    torch.manual_seed(seed)
    cfg = MimiConfig(hidden_size=32, num_filters=4, num_residual_layers=1, codebook_size=64, codebook_dim=16,
                     num_quantizers=2, num_semantic_quantizers=1, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     vector_quantization_hidden_dimension=16, upsample_groups=32)
    m = MimiModel(cfg)
    # random init leaves the codebooks at zero (one code for everything): spread-out centroids instead,
    # so that units vary (and any batching error shows)
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("embed_sum"):
                buf.copy_(torch.randn_like(buf) * 0.05)
            elif name.endswith(("cluster_usage", "initialized")):
                buf.fill_(1.0)
    m.save_pretrained(path)
    return path


def make_hubert(path: str, norm: str = "group", seed: int = 1) -> str:
    import torch
    from transformers import HubertConfig, HubertModel
    torch.manual_seed(seed)
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                       feat_extract_norm=norm, do_stable_layer_norm=(norm == "layer"))
    HubertModel(cfg).save_pretrained(path)
    return path


def tone(sr: int, sec: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(round(sr * sec))) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.5 * t)) + 0.05 * np.random.RandomState(seed).randn(len(t))
            ).astype(np.float32)


def write_audio(folder: str, n: int = 12, seed: int = 0, prefix: str = "u"):
    """Utterances at 16/22.05/24/44.1 kHz, every third stereo, wav and flac; ``manifest.csv``. Returns the rows."""
    import soundfile as sf
    os.makedirs(folder, exist_ok=True)
    rs = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        sr = [16000, 22050, 24000, 44100][i % 4]
        dur = 0.25 + 0.11 * (i % 7)
        t = np.arange(int(sr * dur)) / sr
        x = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t * (1 + t)) + 0.1 * rs.randn(len(t))
        if i % 3 == 0:
            x = np.stack([x, 0.5 * rs.randn(len(t))], 1)
        name = f"{prefix}{i:02d}.wav" if i % 2 else f"{prefix}{i:02d}.flac"
        sf.write(os.path.join(folder, name), x.astype(np.float32), sr)
        rows.append({"path": name, "id": f"{prefix}{i}", "lang": "en" if i % 2 else "fr", "seconds": len(t) / sr})
    with open(os.path.join(folder, "manifest.csv"), "w") as f:
        f.write("path,id,lang\n" + "".join(f"{r['path']},{r['id']},{r['lang']}\n" for r in rows))
    return rows


def write_stories(folder: str, stories: int = 4, sentences: int = 3) -> str:
    """EN-FR parallel stories, one file per sentence; ``manifest.jsonl`` with story / sentence (listed shuffled)."""
    import soundfile as sf
    os.makedirs(folder, exist_ok=True)
    lines = []
    for s in range(stories):
        for lang, sr in (("en", 16000), ("fr", 22050)):
            for k in reversed(range(sentences)):
                name = f"{lang}_s{s}_{k}.wav"
                sf.write(os.path.join(folder, name), tone(sr, 0.4 + 0.15 * k, 100 + 30 * s + 200 * (lang == "fr"),
                                                          s * 10 + k), sr)
                lines.append(json.dumps({"path": name, "lang": lang, "story": f"story{s}", "sentence": k}))
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_storycloze(folder: str, items: int = 3) -> str:
    """``en/`` (whole-story files: context + ending) and ``en-fr/`` (separate context file) layouts."""
    import soundfile as sf
    for sub in ("en", "en-fr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(items):
        ctx = tone(24000, 1.2, 120 + 20 * i, i)
        good, bad = tone(24000, 0.5, 300, 50 + i), tone(24000, 0.5, 700, 60 + i)
        sf.write(os.path.join(folder, "en", f"{i}_correct.wav"), np.concatenate([ctx, good]), 24000)
        sf.write(os.path.join(folder, "en", f"{i}_incorrect.wav"), np.concatenate([ctx, bad]), 24000)
        sf.write(os.path.join(folder, "en-fr", f"{i}_context.wav"), ctx, 24000)
        sf.write(os.path.join(folder, "en-fr", f"{i}_correct.wav"), good, 24000)
        sf.write(os.path.join(folder, "en-fr", f"{i}_incorrect.wav"), bad, 24000)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    o = a.out_dir
    paths = {"mimi": make_mimi(os.path.join(o, "models", "mimi")),
             "hubert": make_hubert(os.path.join(o, "models", "hubert")),
             "utterances": os.path.join(o, "audio", "manifest.csv"),
             "stories": write_stories(os.path.join(o, "stories")),
             "storycloze": write_storycloze(os.path.join(o, "storycloze"))}
    write_audio(os.path.join(o, "audio"))
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
