"""N-language interleaving (issue 23 item 1): ``build --langs/--probs`` and ``--pairs/--pair-weights``; the
two-language shorthand ``--pair/--p`` byte-identical to the build before the designs existed; bad designs and
stories in one line, exit 2, nothing written."""
import filecmp
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaslm.vocab import UnitVocab

from data_tools.build import build_dataset
from data_tools.cli import main

from conftest import ROOT, leftovers, read_docs

EXTS = (".bin", ".idx", ".lang.bin", ".lang.idx")


def stories(path, n, langs, seed=1, min_s=2, max_s=6, present=None):
    """``n`` parallel stories over ``langs`` (2..6 sentences of 1-3 units each, codebook 32; the languages of
    a story are independent draws, aligned by sentence count only); ``present(rng, i)``: the languages story
    ``i`` holds (default all)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = int(rng.integers(min_s, max_s + 1))
            st = {"id": f"s{i}"}
            for l in (present(rng, i) if present else langs):
                st[l] = [rng.integers(0, 32, size=int(rng.integers(1, 4))).tolist() for _ in range(k)]
            f.write(json.dumps(st) + "\n")
    return str(path)


def digest(prefix):
    h = hashlib.sha256()
    for ext in EXTS:
        with open(prefix + ext, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def same_bytes(a, b):
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in EXTS)


def sentence_languages(src, prefix, languages):
    """Each story sentence's language, read back from the language channel (one document per story:
    --target-length 0, no tags or separators), checking that every sentence's tokens are that language's
    rendering of the sentence. Returns (per story: the list of its sentences' languages)."""
    off = UnitVocab(codebook_size=32, languages=languages).offset
    out = []
    with open(src) as f:
        for st, (ids, lid) in zip((json.loads(l) for l in f), read_docs(prefix)):
            pos, langs = 0, []
            n = len(next(v for k, v in st.items() if k != "id"))
            for i in range(n):
                lang = languages[int(lid[pos]) - 1]
                units = st[lang][i]
                assert ids[pos:pos + len(units)].tolist() == [u + off for u in units]
                assert set(lid[pos:pos + len(units)].tolist()) == {int(lid[pos])}
                pos += len(units)
                langs.append(lang)
            assert pos == len(ids) - 1 and lid[-1] == 0
            out.append(langs)
    return out


# --- the two-language shorthand: the bytes of the build before --langs/--pairs existed ---------------------------
# sha256 over .bin, .idx, .lang.bin, .lang.idx of each case, recorded with the code of commit 557916a (the same at
# --workers 1 and 2) from the inputs ``stories(<case>.jsonl, 400, langs, seed=len(case))`` with ``--codebook-size
# 32 --chunk-size 50``.
SHORTHAND = {
    "random_pair_default": (("en", "fr"), ["--mode", "random", "--p", "0.3", "--target-length", "8", "--lang-tags",
                                           "--sentence-sep"],
                            "7e67cd6c6b62ba7a7c617e6871358a5bcd7f1933f31451a3dc6a0313f7f99092"),
    "story_random": (("en", "fr"), ["--mode", "story-random", "--p", "0.6", "--target-length", "0"],
                     "50566111eef0245c04c3555f350d9409f27f335174c4e2e7866f52cd55439b29"),
    "random_pair_fr_de": (("en", "fr", "de"), ["--mode", "random", "--languages", "en,fr,de", "--pair", "fr,de",
                                               "--seed", "4", "--lang-tags"],
                          "80cb529910bddb4784ee79f1d7a5ed624bcddb9c86ed8ac81e4b855e876b3394"),
    "alternate": (("en", "fr"), ["--mode", "alternate", "--seed", "2"],
                  "b670e4754b7d0fa8ecdf57838ae1c342492318f3fb4c31f967c01dac02a1a05a"),
}


def test_pair_shorthand_is_byte_identical_to_the_build_before_n_languages(tmp_path, capsys):
    for name, (langs, args, want) in SHORTHAND.items():
        src = stories(tmp_path / f"{name}.jsonl", 400, langs, seed=len(name))
        prefix = str(tmp_path / name)
        assert main(["build", "-i", src, "-o", prefix, "--codebook-size", "32", "-q", "--chunk-size", "50"] + args) == 0
        assert digest(prefix) == want, name
    # the general designs reduce to it: --langs A,B --probs 1-P,P and --pairs A-B render as --pair A,B --p P
    src = str(tmp_path / "random_pair_default.jsonl")
    common = ["--codebook-size", "32", "-q", "--chunk-size", "50", "--mode", "random", "--target-length", "8",
              "--lang-tags", "--sentence-sep"]
    assert main(["build", "-i", src, "-o", str(tmp_path / "langs"), "--langs", "en,fr", "--probs", "0.7,0.3"]
                + common) == 0
    assert main(["build", "-i", src, "-o", str(tmp_path / "pairs"), "--pairs", "en-fr", "--p", "0.3"] + common) == 0
    for prefix in ("langs", "pairs"):
        assert digest(str(tmp_path / prefix)) == SHORTHAND["random_pair_default"][2], prefix
    m = json.load(open(tmp_path / "random_pair_default.manifest.json"))
    assert m["p"] == 0.3 and m["interleave"]["design"] == "pair" and m["interleave"]["langs"] == ["en", "fr"]
    capsys.readouterr()


def test_three_languages_realise_probs_and_do_not_depend_on_workers(tmp_path):
    langs, probs = ("en", "fr", "de"), (0.5, 0.3, 0.2)
    src = stories(tmp_path / "three.jsonl", 3000, langs, seed=7, min_s=3, max_s=5)
    common = dict(vocab=UnitVocab(codebook_size=32, languages=langs), mode="random", langs=langs, probs=probs,
                  seed=5, target_length=0, progress=False)
    m = build_dataset([src], str(tmp_path / "w1"), workers=1, chunk_size=3000, **common)
    m2 = build_dataset([src], str(tmp_path / "w2"), workers=2, chunk_size=257, **common)
    assert same_bytes(str(tmp_path / "w1"), str(tmp_path / "w2")) and m["content_hash"] == m2["content_hash"]
    assert m["interleave"] == m2["interleave"]
    per_story = sentence_languages(src, str(tmp_path / "w1"), langs)
    drawn = [l for s in per_story for l in s]
    assert len(drawn) >= 10_000
    share = {l: drawn.count(l) / len(drawn) for l in langs}
    for l, p in zip(langs, probs):
        assert abs(share[l] - p) < 0.01, (l, share[l], p)       # within 1 point of the requested probability
    it = m["interleave"]
    assert it["design"] == "langs" and it["langs"] == list(langs) and it["probs"] == list(probs) and m["p"] is None
    real = it["realised"]
    assert real["sentences_per_language"] == {l: drawn.count(l) for l in langs}
    assert real["sentence_share"] == pytest.approx(share)
    assert real["tokens_per_language"] == {l: m["tokens"]["per_language"][l] for l in langs}
    assert real["stories_holding"] == {l: 3000 for l in langs}
    switches = sum(a != b for s in per_story for a, b in zip(s, s[1:]))
    assert sum(real["switches_per_pair"].values()) == switches == m["language_switches"]
    assert real["switch_rate_per_sentence_boundary"] == pytest.approx(1 - sum(p * p for p in probs), abs=0.02)
    lang_ids = set(np.fromfile(str(tmp_path / "w1") + ".lang.bin", dtype=np.uint8).tolist())
    assert lang_ids == {0, 1, 2, 3}                             # the side channel carries every language


def test_stories_holding_a_subset_renormalise_and_story_random_draws_once(tmp_path):
    langs = ("en", "fr", "de")
    held = [("en", "fr", "de"), ("fr", "de"), ("de",)]
    src = stories(tmp_path / "sub.jsonl", 900, langs, seed=3, present=lambda rng, i: held[i % 3])
    vocab = UnitVocab(codebook_size=32, languages=langs)
    m = build_dataset([src], str(tmp_path / "r"), vocab=vocab, mode="random", langs=langs, probs=(0.6, 0.2, 0.2),
                      target_length=0, progress=False)
    per_story = sentence_languages(src, str(tmp_path / "r"), langs)
    fr_de = [l for s in per_story[1::3] for l in s]
    assert set(fr_de) == {"fr", "de"} and abs(fr_de.count("fr") / len(fr_de) - 0.5) < 0.05   # 0.2 : 0.2
    assert {l for s in per_story[2::3] for l in s} == {"de"}
    assert m["interleave"]["realised"]["stories_holding"] == {"en": 300, "fr": 600, "de": 900}
    build_dataset([src], str(tmp_path / "s"), vocab=vocab, mode="story-random", langs=langs, target_length=0,
                  progress=False)
    per_story = sentence_languages(src, str(tmp_path / "s"), langs)
    assert all(len(set(s)) == 1 for s in per_story)             # one language per whole story
    full = [s[0] for s in per_story[0::3]]
    assert all(abs(full.count(l) / len(full) - 1 / 3) < 0.1 for l in langs)   # --probs default: equal


def test_pairs_draw_one_pair_per_story(tmp_path):
    langs = ("en", "fr", "de")
    src = stories(tmp_path / "piv.jsonl", 1200, langs, seed=4,
                  present=lambda rng, i: langs if i % 4 else ("en", "fr"))
    m = build_dataset([src], str(tmp_path / "p"), vocab=UnitVocab(codebook_size=32, languages=langs), mode="random",
                      pairs=(("en", "fr"), ("en", "de")), pair_weights=(1.0, 3.0), target_length=0, progress=False)
    per_story = sentence_languages(src, str(tmp_path / "p"), langs)
    for i, s in enumerate(per_story):       # one pair per story; en-de only where the story holds de
        assert set(s) <= {"en", "fr"} or (i % 4 and set(s) <= {"en", "de"}), (i, s)
    both = [s for i, s in enumerate(per_story) if i % 4]        # stories holding all three: weights 1 : 3
    it = m["interleave"]
    assert it["design"] == "pairs" and it["pairs"] == ["en-fr", "en-de"] and it["pair_weights"] == [0.25, 0.75]
    pairs = it["realised"]["stories_per_pair"]
    assert pairs["en-fr"] + pairs["en-de"] == 1200
    assert abs(pairs["en-de"] / len(both) - 0.75) < 0.05         # only the 900 stories holding de can draw en-de
    assert set(it["realised"]["switches_per_pair"]) == {"en-fr", "en-de"}


BAD = {
    # name: (stories of (en, fr, de) or a list of records, extra CLI args, what the one line must contain)
    "sentence_counts": ([{"id": "a", "en": [[1]], "fr": [[2]]},
                         {"id": "b", "en": [[1], [2]], "fr": [[3], [4]], "de": [[5]]}],
                        ["--langs", "en,fr,de"], ["in.jsonl:2:", "field 'de'", "1 sentences but 'en' has 2"]),
    "probs_sum": (None, ["--langs", "en,fr,de", "--probs", "0.5,0.2,0.2"], ["--probs", "summing to 1", "0.9"]),
    "probs_length": (None, ["--langs", "en,fr,de", "--probs", "0.5,0.5"], ["--probs", "expected 3", "got 2"]),
    "lang_no_story_holds": ([{"id": "a", "en": [[1]], "fr": [[2]]}], ["--langs", "en,fr,de"],
                            ["--langs", "no story", "'de'"]),
    "pair_unknown_language": (None, ["--languages", "en,fr,de", "--pairs", "en-fr,en-xx"],
                              ["--pairs", "en-xx", "unknown language 'xx'"]),
    # --mode mono reads --lang alone when it is outside the default pair (below); a --pair without it is refused
    "mono_lang_outside_pair": (None, ["--languages", "en,fr,de", "--mode", "mono", "--lang", "de", "--pair", "en,fr"],
                               ["in.jsonl:1:", "--lang de", "--pair"]),
}


def test_mono_language_outside_the_default_pair(tmp_path):
    """--mode mono --lang de on en/fr/de stories (a sweep's monolingual stage over an N-language world) reads de
    alone: the same .bin/.idx as reading it in a pair that names it, stories without fr included."""
    src = stories(tmp_path / "in.jsonl", 60, ("en", "fr", "de"))
    common = ["-i", src, "--codebook-size", "32", "-q", "--languages", "en,fr,de", "--mode", "mono", "--lang", "de"]
    assert main(["build", "-o", str(tmp_path / "alone")] + common) == 0
    assert main(["build", "-o", str(tmp_path / "paired"), "--pair", "de,en"] + common) == 0
    assert same_bytes(str(tmp_path / "alone"), str(tmp_path / "paired"))
    assert json.load(open(tmp_path / "alone.manifest.json"))["story_languages"] == ["de"]


def test_bad_designs_and_stories_one_line_exit_2_nothing_written(tmp_path):
    procs = {}
    for name, (records, args, _) in BAD.items():
        d = tmp_path / name
        os.makedirs(d)
        if records is None:
            src = stories(d / "in.jsonl", 5, ("en", "fr", "de"))
        else:
            src = str(d / "in.jsonl")
            with open(src, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        cmd = [sys.executable, "-m", "data_tools", "build", "-i", src, "-o", str(d / "ds"), "--codebook-size", "32",
               "--mode", "random", "-q"] + args
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONPATH": ROOT})
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
        for part in BAD[name][2]:
            assert part in err, (name, part, err)
        assert out == "" and leftovers(tmp_path / name, "ds") == [], name
