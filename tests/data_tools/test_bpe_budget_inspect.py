"""Unit BPE round trip, token budgets, inspect, demo CLI."""
import json
import os

import numpy as np
import pytest

from megaslm.vocab import UnitVocab, read_manifest, vocab_from_manifest

from data_tools.bpe import UnitBPE, decode_tokens, encode_dataset, iter_training_sequences, train_bpe
from data_tools.budget import load_recipe, plan
from data_tools.build import build_dataset
from data_tools.cli import main

from conftest import ROOT, read_docs


@pytest.fixture(scope="module")
def bpe_model(demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    stories = os.path.join(demo["dir"], "stories.jsonl")
    seqs = iter_training_sequences([stories], 64, ("en", "fr"), ("en", "fr"))
    return train_bpe(seqs, str(d / "unit_bpe"), vocab_size=200, codebook_size=64)


def test_bpe_exact_roundtrip_and_compresses(bpe_model, demo):
    bpe = UnitBPE.load(bpe_model)
    rng = np.random.default_rng(0)
    for seq in [rng.integers(0, 64, size=500), np.array([63]), np.arange(64)]:
        ids = bpe.encode(seq)
        assert np.array_equal(bpe.decode(ids), seq)
    # build with BPE: decoding the dataset gives back the unit dataset exactly
    stories = os.path.join(demo["dir"], "stories.jsonl")
    out = os.path.join(os.path.dirname(bpe_model), "en_bpe")
    m = build_dataset([stories], out, vocab=UnitVocab(codebook_size=64), mode="mono", lang="en",
                      bpe_model=bpe_model, progress=False)
    unit_docs = read_docs(demo["prefixes"]["en"])
    bpe_docs = read_docs(out)
    assert len(unit_docs) == len(bpe_docs)
    v = UnitVocab(codebook_size=64)
    for (u, _), (b, bl) in zip(unit_docs, bpe_docs):
        assert np.array_equal(decode_tokens(b, v.offset, bpe_model), np.array(v.decode_ids(u)))
        assert b[-1] == v.eod_id and bl[-1] == 0 and set(bl[:-1]) == {1}
    assert m["bpe"]["pieces"] == bpe.size and m["vocab"]["codebook_size"] == bpe.size
    assert m["tokens"]["total"] < read_manifest(demo["prefixes"]["en"])["tokens"]["total"]
    # re-encode an existing (interleaved) dataset: languages kept per token
    enc = encode_dataset(demo["prefixes"]["enfr_interleaved"], out + "_il", bpe_model)
    for (u, ul), (b, bl) in zip(read_docs(demo["prefixes"]["enfr_interleaved"]), read_docs(out + "_il")):
        for lang in (1, 2):
            assert np.array_equal(decode_tokens(b[bl == lang], v.offset, bpe_model), u[ul == lang] - v.offset)
    assert enc["bpe"]["encoded_from"]


def test_budget_paper_recipe():
    rec = load_recipe(os.path.join(ROOT, "data_tools", "recipes", "paper_1b.yaml"))
    runs = {r["run"]: r for r in plan(rec)}
    assert runs["en_only"]["stages"][0]["steps"] == 75000
    assert runs["en_fr"]["total_tokens"] == 61_440_000_000
    assert runs["en_fr"]["stages"][0]["sources"]["fr"]["tokens"] == pytest.approx(15.36e9)
    assert runs["interleaving"]["total_tokens"] == 52_224_000_000
    assert runs["interleaving_ft"]["total_tokens"] / 614400 == 100000
    assert all(s["whole_steps"] for r in runs.values() for s in r["stages"])
    assert any("'en' repeated" in w for w in runs["en_only"]["warnings"])


def test_budget_cli_sources_and_partial_steps(tmp_path, demo, capsys):
    rec = {"stages": [{"name": "a", "tokens": 1000, "mixture": {"en": 1, "fr": 1}},
                      {"name": "b", "tokens": 250, "mixture": {"en": 1}}]}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(rec))
    rc = main(["budget", str(p), "--source", "en=" + demo["prefixes"]["en"], "--source", "fr=100",
               "--tokens-per-step", "100", "--repeat-warning", "2", "--json"])
    out = json.loads(capsys.readouterr().out)[0]
    assert rc == 0 and out["stages"][1]["steps"] == 2.5 and not out["stages"][1]["whole_steps"]
    assert out["stages"][0]["sources"]["fr"]["epochs"] == 5.0
    assert any("'fr' repeated 5.00" in w for w in out["warnings"])
    en_total = read_manifest(demo["prefixes"]["en"])["tokens"]["total"]
    assert out["stages"][1]["sources"]["en"]["cumulative_epochs"] == pytest.approx(750 / en_total)


def test_inspect_cli(demo, tmp_path, capsys):
    png = str(tmp_path / "h.png")
    rc = main(["inspect", demo["prefixes"]["enfr_interleaved"], "--histogram", png, "--verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "per sentence boundary" in out and "content hash OK" in out
    assert os.path.getsize(png) > 1000


def test_demo_cli(tmp_path, capsys):
    rc = main(["demo", str(tmp_path / "d"), "--num-stories", "20", "--codebook-size", "32"])
    prefixes = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(prefixes) == {"en", "fr", "enfr_interleaved"}
    assert vocab_from_manifest(prefixes["fr"]) == UnitVocab(codebook_size=32)
