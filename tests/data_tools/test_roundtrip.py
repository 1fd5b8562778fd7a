"""Units in == units read back through megatron-core's readers; manifest; layout options."""
import json
import os

import numpy as np
import pytest

from megaslm.vocab import UnitVocab, read_manifest, vocab_from_manifest

from data_tools.build import build_dataset
from data_tools.streams import BuildOptions

from conftest import read_docs, write_jsonl


def _utts(rng, n, C, lang=None):
    out = []
    for i in range(n):
        u = rng.integers(0, C, size=int(rng.integers(1, 40))).tolist()
        r = {"file_name": f"u{i}.flac", "units": u, "duration": [2] * len(u)}
        if lang:
            r["lang"] = lang
        out.append(r)
    return out


def test_jsonl_utterances_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    C = 2048
    utts = _utts(rng, 50, C) + _utts(rng, 20, C, lang="fr")
    src = write_jsonl(tmp_path / "libri.jsonl", utts)
    prefix = str(tmp_path / "out" / "mono")
    m = build_dataset([src], prefix, vocab=UnitVocab(codebook_size=C), progress=False)
    docs = read_docs(prefix)
    assert len(docs) == len(utts) == m["documents"]
    vocab = vocab_from_manifest(prefix)
    for r, (ids, lid) in zip(utts, docs):
        assert ids.dtype == np.int64 and ids[-1] == vocab.eod_id and lid[-1] == 0
        assert vocab.decode_ids(ids) == r["units"]
        assert list(ids[:-1]) == vocab.encode_units(r["units"])
        assert set(lid[:-1]) == {vocab.lang_id(r.get("lang", "en"))}
    n_en = sum(len(r["units"]) for r in utts if "lang" not in r)
    n_fr = sum(len(r["units"]) for r in utts if "lang" in r)
    assert m["tokens"]["per_language"] == {"en": n_en, "fr": n_fr, "none": len(utts)}
    assert m["tokens"]["total"] == n_en + n_fr + len(utts)
    assert m["tokens"]["per_source"] == {"libri": m["tokens"]["total"]}
    assert m["hours"]["en"] == pytest.approx(2 * n_en / 12.5 / 3600)   # duration: 2 frames per unit
    assert m["dtype"] == "uint16" and m["seed"] == 0 and m["mode"] == "mono"
    assert read_manifest(prefix)["content_hash"] == m["content_hash"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["mono.bin", "mono.idx", "mono.lang.bin", "mono.lang.idx", "mono.manifest.json"])


def test_npy_and_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    lens = [5, 9, 1, 30]
    units = rng.integers(0, 500, size=sum(lens)).astype(np.int32)
    off = np.r_[0, np.cumsum(lens)]
    np.save(tmp_path / "a.npy", units)
    write_jsonl(tmp_path / "a.bounds.jsonl",
                [{"id": f"x{i}", "start": int(off[i]), "end": int(off[i + 1]), "lang": "fr" if i == 2 else "en"}
                 for i in range(len(lens))])
    np.savez(tmp_path / "b.npz", units=units, offsets=off)
    vocab = UnitVocab(codebook_size=500)
    m = build_dataset([str(tmp_path / "a.npy"), "hub=" + str(tmp_path / "b.npz")], str(tmp_path / "o"),
                      vocab=vocab, source_type="hubert50", progress=False)
    docs = read_docs(str(tmp_path / "o"))
    assert len(docs) == 8
    for k, (ids, lid) in enumerate(docs):
        i = k % 4
        assert vocab.decode_ids(ids) == units[off[i]:off[i + 1]].tolist()
        assert lid[0] == (2 if (k == 2) else 1)
    assert set(m["tokens"]["per_source"]) == {"a", "hub"}
    assert m["source"] == {"name": "hubert50", "frame_rate": 50.0}


def _stories(rng, n, C, nsent=(2, 6)):
    out = []
    for s in range(n):
        k = int(rng.integers(*nsent))
        out.append({"id": f"s{s}",
                    "en": [rng.integers(0, C, size=int(rng.integers(1, 12))).tolist() for _ in range(k)],
                    "fr": [rng.integers(0, C, size=int(rng.integers(1, 12))).tolist() for _ in range(k)]})
    return out


@pytest.mark.parametrize("mode", ["mono", "random", "alternate"])
def test_stories_sentences_whole_with_tags_and_sep(tmp_path, mode):
    rng = np.random.default_rng(2)
    stories = _stories(rng, 40, 100)
    src = write_jsonl(tmp_path / "st.jsonl", stories)
    vocab = UnitVocab(codebook_size=100, lang_tags=True, sentence_sep=True)
    prefix = str(tmp_path / mode)
    build_dataset([src], prefix, vocab=vocab, mode=mode, lang="fr", target_length=0, add_bos=True, progress=False)
    docs = read_docs(prefix)
    assert len(docs) == len(stories)
    for st, (ids, lid) in zip(stories, docs):
        assert ids[0] == vocab.bos_id and ids[-1] == vocab.eod_id
        body, lbody = ids[1:-1], lid[1:-1]
        cuts = np.flatnonzero(body == vocab.sep_id)
        sents = np.split(np.arange(body.size), cuts)
        assert len(sents) == len(st["en"])
        prev = None
        langs = []
        for i, pos in enumerate(sents):
            pos = pos[1:] if i else pos                     # drop the separator
            toks = body[pos]
            if toks[0] < vocab.offset:                      # a language tag
                tag = toks[0]
                toks, ltoks = toks[1:], lbody[pos][1:]
            else:
                tag, ltoks = None, lbody[pos]
            lang = vocab.languages[int(ltoks[0]) - 1]
            assert set(ltoks) == {vocab.lang_id(lang)}
            assert vocab.decode_ids(toks) == st[lang][i]    # the sentence, whole, in its language
            assert (tag is not None) == (lang != prev)
            if tag is not None:
                assert tag == vocab.lang_tag_id(lang)
            prev = lang
            langs.append(lang)
        if mode == "mono":
            assert set(langs) == {"fr"}
        if mode == "alternate":
            assert all(a != b for a, b in zip(langs, langs[1:]))
        assert set(lid[np.isin(ids, [vocab.bos_id, vocab.eod_id, vocab.sep_id])]) == {0}


def test_target_length_splits_at_sentence_boundaries(tmp_path):
    story = {"id": 0, "en": [[1] * 10, [2] * 10, [3] * 50, [4] * 3, [5] * 3], "fr": [[1]] * 5}
    src = write_jsonl(tmp_path / "st.jsonl", [story])
    vocab = UnitVocab(codebook_size=10)
    build_dataset([src], str(tmp_path / "o"), vocab=vocab, mode="mono", lang="en", target_length=25,
                  progress=False)
    docs = [vocab.decode_ids(ids) for ids, _ in read_docs(str(tmp_path / "o"))]
    # 10+10+eod fits 25; the 50-unit sentence stays whole; 3+3+eod fits
    assert docs == [[1] * 10 + [2] * 10, [3] * 50, [4] * 3 + [5] * 3]


def test_dedup(tmp_path):
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": "a", "units": [5, 5, 5, 7, 7, 5, 1, 1]}])
    vocab = UnitVocab(codebook_size=10, dedup=True)
    m = build_dataset([src], str(tmp_path / "o"), vocab=vocab, source_type="hubert50", progress=False)
    (ids, _), = read_docs(str(tmp_path / "o"))
    assert vocab.decode_ids(ids) == [5, 7, 5, 1]
    assert m["vocab"]["dedup"] is True and m["units_in"] == 8
    assert m["hours"]["en"] == pytest.approx(8 / 50 / 3600)   # hours count source frames, before dedup


def test_manifest_vocab_is_the_contract(demo):
    m = read_manifest(demo["prefixes"]["enfr_interleaved"])
    assert UnitVocab.from_dict(m["vocab"]) == UnitVocab(codebook_size=64)
    for k in ("version", "mode", "p", "seed", "source", "tokens", "documents", "hours", "content_hash",
              "bpe", "quarantine", "inputs"):
        assert k in m
    assert os.path.isfile(os.path.join(demo["dir"], "stories.jsonl"))
