"""Tiny random-weight Mimi and HuBERT models (from their transformers configs) and synthetic audio."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def py(args, timeout=600, **kw):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def make_mimi(path):
    import torch
    from transformers import MimiConfig, MimiModel
    torch.manual_seed(0)
    cfg = MimiConfig(hidden_size=32, num_filters=4, num_residual_layers=1, codebook_size=64, codebook_dim=16,
                     num_quantizers=2, num_semantic_quantizers=1, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     vector_quantization_hidden_dimension=16, upsample_groups=32)
    m = MimiModel(cfg)
    # random init leaves the codebooks at zero usage/sum (one code for everything): give them spread-out
    # centroids so that units vary and any batching error would show
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("embed_sum"):
                buf.copy_(torch.randn_like(buf) * 0.05)
            elif name.endswith("cluster_usage"):
                buf.fill_(1.0)
            elif name.endswith("initialized"):
                buf.fill_(1.0)
    m.save_pretrained(path)
    return path


def make_hubert(path, norm="group"):
    from transformers import HubertConfig, HubertModel
    import torch
    torch.manual_seed(1)
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                       feat_extract_norm=norm, do_stable_layer_norm=(norm == "layer"))
    HubertModel(cfg).save_pretrained(path)
    return path


def write_audio(folder, n=12, seed=0, prefix="u"):
    """Tones + noise at 16/22.05/24/44.1 kHz, every third file stereo; a CSV manifest. Returns the rows."""
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


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"mimi": make_mimi(str(d / "mimi")), "hubert": make_hubert(str(d / "hubert")),
            "hubert_layer": make_hubert(str(d / "hubert_layer"), "layer")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    rows = write_audio(str(d), n=12)
    return str(d), rows
