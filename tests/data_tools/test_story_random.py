"""--mode story-random (one language per whole story) and mixed builds (utterances + parallel stories)."""
import filecmp
import json

import numpy as np

from megaslm.vocab import UnitVocab

from data_tools.build import build_dataset
from data_tools.cli import main
from data_tools.synthetic import make_stories

from conftest import read_docs, write_jsonl


def _stories(path, n, seed=5):
    return write_jsonl(path, make_stories(n, 32, seed=seed, min_len=1, max_len=3))


def test_story_random_one_language_per_story_matches_p(tmp_path):
    src = _stories(tmp_path / "s.jsonl", 3000)
    p = 0.3
    prefix = str(tmp_path / "sr")
    m = build_dataset([src], prefix, vocab=UnitVocab(codebook_size=32), mode="story-random", p=p, seed=3,
                      target_length=0, progress=False)
    docs = read_docs(prefix)
    assert len(docs) == 3000 and m["p"] == p and m["mode"] == "story-random"
    story_lang = []
    with open(src) as f:
        stories = [json.loads(l) for l in f]
    for st, (ids, lid) in zip(stories, docs):
        langs = set(lid[:-1].tolist())
        assert len(langs) == 1                      # the whole story in one language
        lang = "en" if langs == {1} else "fr"
        units = np.concatenate([np.asarray(s) for s in st[lang]]) + UnitVocab(codebook_size=32).offset
        assert np.array_equal(ids[:-1], units)      # ... and it is that language's rendering
        story_lang.append(lang == "fr")
    frac = float(np.mean(story_lang))
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / len(story_lang))
    assert m["language_switches"] == 0 and m["sentence_boundaries"] > 0
    # other seed -> other draws; p=0 / p=1 -> all first / all second language
    m0 = build_dataset([src], str(tmp_path / "p0"), vocab=UnitVocab(codebook_size=32), mode="story-random",
                       p=0.0, progress=False)
    assert m0["tokens"]["per_language"]["fr"] == 0
    m1 = build_dataset([src], str(tmp_path / "p1"), vocab=UnitVocab(codebook_size=32), mode="story-random",
                       p=1.0, progress=False)
    assert m1["tokens"]["per_language"]["en"] == 0


def test_story_random_byte_identical_for_any_worker_count(tmp_path):
    src = _stories(tmp_path / "s.jsonl", 1500)
    common = dict(vocab=UnitVocab(codebook_size=32), mode="story-random", p=0.5, seed=9, target_length=8,
                  progress=False)
    build_dataset([src], str(tmp_path / "a"), workers=1, chunk_size=1500, **common)
    build_dataset([src], str(tmp_path / "b"), workers=2, chunk_size=97, **common)
    for ext in (".bin", ".idx", ".lang.bin", ".lang.idx"):
        assert filecmp.cmp(str(tmp_path / "a") + ext, str(tmp_path / "b") + ext, shallow=False), ext


def test_random_mode_mixes_utterance_files_and_stories_in_one_command(tmp_path, capsys):
    stories = _stories(tmp_path / "par.jsonl", 200)
    utt = write_jsonl(tmp_path / "en_utt.jsonl", [{"file_name": f"u{i}.flac", "units": [i % 32, 3, 4], "lang":
                                                   "en" if i % 2 else "fr"} for i in range(50)])
    prefix = str(tmp_path / "arm")
    for mode in ("random", "story-random"):
        assert main(["build", "-i", f"par={stories}", "-i", f"utt={utt}", "-o", prefix, "--mode", mode,
                     "--p", "0.5", "--codebook-size", "32", "--target-length", "0", "-q"]) == 0
        man = json.load(open(prefix + ".manifest.json"))
        docs = read_docs(prefix)
        assert len(docs) == 250
        off = UnitVocab(codebook_size=32).offset
        for i, (ids, lid) in enumerate(docs[200:]):          # utterances copied as they are, own language
            assert ids.tolist() == [i % 32 + off, 3 + off, 4 + off, 2]
            assert lid.tolist() == [1 if i % 2 else 2] * 3 + [0]
        per_src = man["tokens"]["per_source"]
        assert per_src["utt"] == 200 and per_src["par"] == man["tokens"]["total"] - 200
    assert "wrote" in capsys.readouterr().out
