"""Parallel-story audio -> tokenize -> build -> a short training run; a spoken StoryCloze converted from
audio and scored by launchers/eval.py; mixed tokenisers refused by build, training and the converter."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import ROOT, py
from data_tools.audio.demo import tone, write_stories, write_storycloze


def test_audio_to_training_and_eval(models, tmp_path):
    manifest = write_stories(str(tmp_path / "stories"))   # sentences listed in reverse: the index decides
    st = str(tmp_path / "stories.jsonl")
    r = py(["-m", "data_tools", "tokenize", "--manifest", manifest, "--tokenizer", "mimi",
            "--model-dir", models["mimi"], "-o", st, "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    stories = [json.loads(l) for l in open(st)]
    assert [s["id"] for s in stories] == [f"story{i}" for i in range(4)]
    for s in stories:
        assert [len(x) for x in s["en"]] == [5, 7, 9] and len(s["fr"]) == 3   # ceil((0.4 + .15k) * 12.5)
    src = json.load(open(tmp_path / "stories.units.json"))["unit_source"]

    prefix = str(tmp_path / "ds" / "enfr")
    r = py(["-m", "data_tools", "build", "-i", st, "-o", prefix, "--mode", "random", "--codebook-size", "64", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.load(open(prefix + ".manifest.json"))
    assert man["vocab"]["unit_source"] == src and man["source"]["frame_rate"] == 12.5

    # training: the library refuses a vocabulary naming no (or another) unit source; the launcher adopts the
    # one every dataset records when the config names none, and the resolved config names it
    from megaslm.config import ConfigError
    from megaslm.data import check_manifest
    from megaslm.vocab import UnitVocab
    with pytest.raises(ConfigError, match="unit_source"):
        check_manifest(prefix, UnitVocab(codebook_size=64))
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    cfg.update(output_dir=str(tmp_path / "run"))
    cfg["vocab"] = {"codebook_size": 64, "languages": ["en", "fr"]}
    cfg["data"]["demo"] = False
    cfg["model"].update(num_layers=2, seq_length=32)
    cfg["schedule"].update(micro_batch_size=2, global_batch_size=2,
                           stages=[{"name": "main", "train_steps": 3, "data": [{"path": prefix}]}])
    cfg["checkpoint"] = {"interval": 0, "save": True}
    cfg.pop("eval", None)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = py(["launchers/pretrain.py", "--config", str(tmp_path / "cfg.yaml")])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["vocab"]["unit_source"] == src
    r = py(["launchers/pretrain.py", "--config", str(tmp_path / "cfg.yaml"), "vocab.unit_source=hubert:other",
            "output_dir=" + str(tmp_path / "run-other")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "unit_source" in last, r.stderr[-3000:]

    # spoken StoryCloze from audio: EN (context + ending in one file) and EN->FR (separate context file)
    b = write_storycloze(str(tmp_path / "ssc"))         # en/: whole-story files; en-fr/: context file
    bench = tmp_path / "bench"
    r = py(["-m", "data_tools", "tokenize-bench", "storycloze", b, "--tokenizer", "mimi", "--model-dir",
            models["mimi"], "--like", prefix, "-o", str(bench), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    items = [json.loads(l) for l in open(bench / "storycloze.jsonl")]
    assert len(items) == 6 and {tuple(i["languages"]) for i in items} == {("en", "en"), ("en", "fr")}
    for it in items:
        assert len(it["context"]) >= 15 - 1 and all(len(c) >= 1 for c in it["candidates"])
    out = tmp_path / "evals"
    r = py(["launchers/eval.py", "--checkpoint", str(tmp_path / "run"), "--benchmarks", str(bench), "--out", str(out)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.dumps(json.load(open(out / "results.json")))
    assert "sSC-EN" in res and ("sSC EN\\u2192FR" in res or "sSC EN→FR" in res)

    # listening: prompt + continuation decoded by the Mimi that made the units (first codebook only)
    wav = tmp_path / "cont.wav"
    r = py(["launchers/sample.py", "--checkpoint", str(tmp_path / "run"), "--prompt", "1 2 3 4", "--max-new", "6",
            "--wav", str(wav), "--tokenizer-dir", models["mimi"]])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    s_out = json.loads(r.stdout.strip().splitlines()[-1])
    x, sr = sf.read(wav)
    n = 4 + len(s_out["continuation"])
    assert sr == 24000 and len(x) == n * 1920 and np.isfinite(x).all()
    r = py(["launchers/sample.py", "--checkpoint", str(tmp_path / "run"), "--prompt", "1 2", "--max-new", "2",
            "--wav", str(tmp_path / "no.wav"), "--tokenizer-dir", models["hubert"]])
    assert r.returncode == 2 and "checkpoint hash" in r.stderr and not (tmp_path / "no.wav").exists()

    # another tokeniser's units: refused by the converter and by build
    np.save(tmp_path / "km.npy", np.random.RandomState(0).randn(64, 32).astype(np.float32))
    hub = ["--tokenizer", "hubert", "--model-dir", models["hubert"], "--layer", "1", "--kmeans", str(tmp_path / "km.npy")]
    r = py(["-m", "data_tools", "tokenize-bench", "storycloze", b, *hub, "--like", prefix, "-o",
            str(tmp_path / "bench2"), "-q"])
    assert r.returncode == 2 and "tokenised by mimi:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bench2").exists()
    utt = tmp_path / "utt"
    utt.mkdir()
    sf.write(utt / "x.wav", tone(16000, 0.5, 200, 0), 16000)
    r = py(["-m", "data_tools", "tokenize", "--folder", str(utt), *hub, "-o", str(tmp_path / "h.jsonl"), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = py(["-m", "data_tools", "tokenize", "--folder", str(utt), "--tokenizer", "mimi", "--model-dir",
            models["mimi"], "-o", str(tmp_path / "m.jsonl"), "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = py(["-m", "data_tools", "build", "-i", str(tmp_path / "h.jsonl"), "-i", str(tmp_path / "m.jsonl"), "-o",
            str(tmp_path / "mixed"), "--codebook-size", "64", "-q"])
    assert r.returncode == 2 and "cannot share a vocabulary" in r.stderr and "m.jsonl" in r.stderr
    assert not os.path.exists(str(tmp_path / "mixed") + ".bin")
