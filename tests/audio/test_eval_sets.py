"""data_tools/audio/eval_sets.py: benchmark layouts -> evals JSONL read back by evals.load_benchmark:
gold.csv (sWUGGY), pair files (sBLIMP), deduplicated training units, bad layouts."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from data_tools.audio.eval_sets import convert_benchmark
from data_tools.audio.demo import tone
from data_tools.audio.tokenizers import load_tokenizer
from data_tools.errors import DataError
from megaslm.vocab import UnitVocab


def _like(tmp_path, source, name="train"):
    prefix = str(tmp_path / name)
    with open(prefix + ".manifest.json", "w") as f:
        json.dump({"vocab": UnitVocab(codebook_size=64, unit_source=source).to_dict()}, f)
    return prefix


def test_layouts(models, tmp_path):
    from evals.benchmarks import load_benchmark
    tok = load_tokenizer("mimi", models["mimi"], device="cpu")
    w = tmp_path / "swuggy" / "en"
    w.mkdir(parents=True)
    rows = ["id,filename,correct,word"]
    for i in range(3):
        sf.write(w / f"w{i}.wav", tone(16000, 0.3 + 0.1 * i, 200 + 50 * i, i), 16000)
        sf.write(w / f"n{i}.wav", tone(16000, 0.3 + 0.1 * i, 900 - 50 * i, 10 + i), 16000)
        rows += [f"p{i},n{i},0,x", f"p{i},w{i}.wav,1,x"]
    (w / "gold.csv").write_text("\n".join(rows) + "\n")
    r = convert_benchmark("swuggy", str(tmp_path / "swuggy"), str(tmp_path / "b1"), tok,
                          like=_like(tmp_path, tok.unit_source), progress=False)
    assert r["items"] == 3
    b = load_benchmark(str(tmp_path / "b1"))
    assert [it.task for it in b.items] == ["sWUGGY"] * 3 and b.vocab.unit_source == tok.unit_source
    direct = tok.encode_batch([tok.pad_to_frames(tone(24000, 0.3, 200, 0))])   # w0 at 24 kHz is another file:
    assert len(b.items[0].candidates[0]) == len(direct[0])                   # same frame count
    assert all(it.context == [] and it.correct == 0 for it in b.items)

    # pair files in ROOT (language = the vocabulary's first); deduplicated training units -> deduplicated here
    s = tmp_path / "sblimp"
    s.mkdir()
    for i in range(2):
        sf.write(s / f"{i}_correct.flac", tone(24000, 0.8, 100, i), 24000)
        sf.write(s / f"{i}_incorrect.flac", tone(24000, 0.8, 500, i), 24000)
    like = _like(tmp_path, tok.unit_source + ":dedup", "dd")
    convert_benchmark("sblimp", str(s), str(tmp_path / "b2"), tok, like=like, progress=False)
    items = load_benchmark(str(tmp_path / "b2")).items
    raw = tok.encode_batch([tok.pad_to_frames(tone(24000, 0.8, 100, 0))])[0].tolist()
    assert items[0].candidates[0] == [u for k, u in enumerate(raw) if k == 0 or raw[k - 1] != u]

    with pytest.raises(DataError, match="share no leading units|needs one correct"):
        (s / "2_correct.flac").write_bytes((s / "0_correct.flac").read_bytes())
        convert_benchmark("storycloze", str(s), str(tmp_path / "b3"), tok, like=like, progress=False)
    with pytest.raises(DataError, match="records no tokeniser"):
        convert_benchmark("sblimp", str(s), str(tmp_path / "b4"), tok, like=_like(tmp_path, "", "none"),
                          progress=False)
    (s / "oops.wav").write_bytes((s / "0_correct.flac").read_bytes())
    with pytest.raises(DataError, match="oops.wav: expected <id>_correct"):
        convert_benchmark("sblimp", str(s), str(tmp_path / "b5"), tok, like=like, progress=False)
    assert not any(os.path.exists(tmp_path / f"b{i}") for i in (3, 4, 5))
