"""Interleaving statistics match p; determinism across worker counts and chunk sizes."""
import filecmp
import json

import numpy as np
import pytest

from megaslm.vocab import UnitVocab

from data_tools.build import build_dataset
from data_tools.stats import dataset_stats
from data_tools.synthetic import make_stories

from conftest import read_docs


@pytest.fixture(scope="module")
def big_stories(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    path = d / "stories.jsonl"
    with open(path, "w") as f:
        for st in make_stories(4000, 32, seed=3, min_len=1, max_len=3):
            f.write(json.dumps(st) + "\n")
    return str(path)


def test_random_interleaving_matches_p(big_stories, tmp_path):
    p = 0.3
    prefix = str(tmp_path / "r")
    m = build_dataset([big_stories], prefix, vocab=UnitVocab(codebook_size=32), mode="random", p=p, seed=7,
                      progress=False)
    docs = read_docs(prefix)
    langs = []   # the language of each sentence: units of a sentence share it; recover sentences from stories
    with open(big_stories) as f:
        stories = [json.loads(l) for l in f]
    for st, (ids, lid) in zip(stories, docs):
        pos = 0
        for e, r in zip(st["en"], st["fr"]):
            ln = len(e)
            assert len(e) == len(r)          # synthetic FR = mapped EN: same length
            seg = lid[pos:pos + ln]
            assert len(set(seg)) == 1
            langs.append(int(seg[0]))
            pos += ln
        assert pos == len(ids) - 1
    langs = np.array(langs)
    n = langs.size
    assert n > 15000
    frac_fr = float(np.mean(langs == 2))
    assert abs(frac_fr - p) < 4 * np.sqrt(p * (1 - p) / n)
    s = dataset_stats(prefix)
    assert s["switch_rate_per_sentence_boundary"] == pytest.approx(2 * p * (1 - p), abs=0.02)
    assert s["language_switches"] == m["language_switches"]
    assert s["per_language"] == m["tokens"]["per_language"]


def test_alternate_and_mono_switch_rates(big_stories, tmp_path):
    v = UnitVocab(codebook_size=32)
    build_dataset([big_stories], str(tmp_path / "a"), vocab=v, mode="alternate", progress=False)
    build_dataset([big_stories], str(tmp_path / "m"), vocab=v, mode="mono", lang="fr", progress=False)
    assert dataset_stats(str(tmp_path / "a"))["switch_rate_per_sentence_boundary"] == 1.0
    s = dataset_stats(str(tmp_path / "m"))
    assert s["switch_rate_per_sentence_boundary"] == 0.0 and s["per_language"]["en"] == 0


def test_deterministic_across_workers_and_chunks(big_stories, tmp_path):
    v = UnitVocab(codebook_size=32)
    common = dict(vocab=v, mode="random", p=0.5, seed=11, progress=False, target_length=8)
    m1 = build_dataset([big_stories], str(tmp_path / "w1"), workers=1, chunk_size=4000, **common)
    m2 = build_dataset([big_stories], str(tmp_path / "w2"), workers=2, chunk_size=333, **common)
    for ext in (".bin", ".idx", ".lang.bin", ".lang.idx"):
        assert filecmp.cmp(str(tmp_path / "w1") + ext, str(tmp_path / "w2") + ext, shallow=False), ext
    assert m1["content_hash"] == m2["content_hash"]
    m3 = build_dataset([big_stories], str(tmp_path / "s"), workers=1, **{**common, "seed": 12})
    assert m3["content_hash"] != m1["content_hash"]
