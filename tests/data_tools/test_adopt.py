"""``python -m data_tools adopt``: a .bin/.idx written by megatron-core's own IndexedDatasetBuilder (as Megatron-LM's
tools/preprocess_data.py writes one) is checked, gets its manifest and language channel, and trains; every
refusal is one line and writes nothing."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from data_tools.cli import main

CODEBOOK = 128


def megatron_dataset(prefix, docs=60, offset=3, eod=2, dtype=np.uint16, seed=0):
    """Documents of units + ``offset`` ending with ``eod``, through megatron-core's builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for _ in range(docs):
        units = rng.integers(0, CODEBOOK, int(rng.integers(20, 90))) + offset
        b.add_item(torch.from_numpy(np.append(units, eod).astype(np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def _adopt(prefix, *extra):
    return main(["adopt", prefix, "--codebook-size", str(CODEBOOK), *extra])


def test_adopted_megatron_dataset_is_checked_and_trains(tmp_path, capsys):
    p = megatron_dataset(str(tmp_path / "mlm"))
    assert _adopt(p, "--language", "fr", "--offset", "3") == 0, capsys.readouterr().err
    m = json.load(open(p + ".manifest.json"))
    assert m["documents"] == 60 and m["adopted"]["special_tokens"]["eod"] == 60
    assert m["adopted"]["sequences_ending_with_eod"] == 60 and m["lang_channel"] == ".lang"
    lang = np.fromfile(p + ".lang.bin", np.uint8)
    tokens = np.fromfile(p + ".bin", np.uint16)
    assert np.array_equal(lang, np.where(tokens == 2, 0, 2))       # fr = language id 2, eod = 0
    from megaslm.data import check_manifest
    from megaslm.vocab import UnitVocab
    check_manifest(p, UnitVocab(codebook_size=CODEBOOK), verify_hash=True, need_lang=True)
    assert _adopt(p) == 2 and "a manifest is already there" in capsys.readouterr().err
    # one short launch on it (the tiny test model, 2 steps)
    cfg = {"name": "adopt", "output_dir": str(tmp_path / "run"), "seed": 1, "precision": "fp32",
           "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                     "num_query_groups": 2, "seq_length": 32, "attention_backend": "reference",
                     "embedding_backend": "reference"},
           "vocab": {"codebook_size": CODEBOOK, "languages": ["en", "fr"]},
           "data": {"demo": False, "verify_hash": True},
           "schedule": {"micro_batch_size": 2, "global_batch_size": 4, "warmup_fraction": 0.1,
                        "stages": [{"name": "s", "train_steps": 2, "data": [{"path": p, "weight": 1.0}]}]},
           "checkpoint": {"interval": 0}, "logging": {"interval": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--config",
                        str(tmp_path / "c.yaml")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if l.strip()]
    assert steps[-1]["step"] == 2 and all(np.isfinite(s["loss"]) for s in steps if "loss" in s)


def _listing(d):
    return sorted((f, os.path.getsize(os.path.join(d, f))) for f in os.listdir(d))


@pytest.mark.parametrize("case,what", [
    ("offset", "--offset 0: the vocabulary puts unit 0 at id 3"),
    ("too_big", "outside the vocabulary [0, 131) (codebook 128 at offset 3)"),
    ("truncated_bin", "bytes, expected"),
    ("garbage_idx", "not a megatron-core indexed-dataset index"),
    ("float", "floating point"),
    ("language", "--language de: not in the vocabulary's languages ['en', 'fr']"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, case, what):
    d = tmp_path / "d"
    d.mkdir()
    p = str(d / "x")
    if case == "too_big":
        megatron_dataset(p, docs=5, offset=5)                 # units 0..127 at 5..132: past the vocabulary
    elif case == "float":
        megatron_dataset(p, docs=5, dtype=np.float32)
    else:
        megatron_dataset(p, docs=5, offset=0 if case == "offset" else 3)
    if case == "truncated_bin":
        with open(p + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(p + ".bin") - 2)
    if case == "garbage_idx":
        open(p + ".idx", "wb").write(b"\x00" * 64)
    before = _listing(d)
    args = {"offset": ["--offset", "0"], "language": ["--language", "de"]}.get(case, ["--language", "en"])
    assert _adopt(p, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and what in err, err
    assert _listing(d) == before
