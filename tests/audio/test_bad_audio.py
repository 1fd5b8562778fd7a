"""Bad audio and manifests: one line naming the file, exit 2, nothing written; --skip-bad quarantines."""
import json
import os

import numpy as np
import soundfile as sf

from conftest import py


def test_bad_inputs(models, tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    sf.write(d / "good.wav", (0.1 * np.random.RandomState(0).randn(16000)).astype(np.float32), 16000)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    sf.write(d / "empty.wav", np.zeros((0,), np.float32), 16000)
    sf.write(d / "short.wav", np.zeros((100,), np.float32), 16000)          # < HuBERT's 400-sample window
    sf.write(d / "six.wav", np.zeros((16000, 6), np.float32), 16000)
    np.save(tmp_path / "km.npy", np.random.RandomState(0).randn(8, 32).astype(np.float32))
    tok = ["--tokenizer", "hubert", "--model-dir", models["hubert"], "--layer", "1", "--kmeans", str(tmp_path / "km.npy"),
           "-q"]
    cases = {
        "corrupt.wav": "unreadable audio", "empty.wav": "empty audio", "short.wav": "too short",
        "six.wav": "6 channels: expected mono or stereo",
    }
    for i, (name, msg) in enumerate(cases.items()):
        (tmp_path / f"m{i}.csv").write_text(f"path\ngood.wav\n{name}\n".replace("good.wav", str(d / "good.wav"))
                                            .replace(f"\n{name}", f"\n{d / name}"))
        out = tmp_path / f"o{i}.jsonl"
        r = py(["-m", "data_tools", "tokenize", "--manifest", str(tmp_path / f"m{i}.csv"), *tok, "-o", str(out)])
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and name in err[0] and msg in err[0], r.stderr[-2000:]
        assert not out.exists() and not os.path.exists(str(out) + ".work")
    # manifests
    (tmp_path / "bad.csv").write_text("path,lang\ngood.wav,en\nmissing.wav,en\n")
    (tmp_path / "good.wav").write_bytes((d / "good.wav").read_bytes())
    r = py(["-m", "data_tools", "tokenize", "--manifest", str(tmp_path / "bad.csv"), *tok, "-o", str(tmp_path / "x.jsonl")])
    assert r.returncode == 2 and "bad.csv:3: field 'path': audio file not found" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"path": "good.wav", "story": "s", "sentence": "two"}\n')
    r = py(["-m", "data_tools", "tokenize", "--manifest", str(tmp_path / "bad.jsonl"), *tok, "-o", str(tmp_path / "x.jsonl")])
    assert r.returncode == 2 and "bad.jsonl:1: field 'sentence'" in r.stderr and "Traceback" not in r.stderr
    # quarantine
    (tmp_path / "all.csv").write_text("path\n" + "".join(f"{d / n}\n" for n in ["good.wav", *cases]))
    r = py(["-m", "data_tools", "tokenize", "--manifest", str(tmp_path / "all.csv"), *tok, "--skip-bad",
            "-o", str(tmp_path / "q.jsonl")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(open(tmp_path / "q.jsonl").readlines()) == 1
    q = [json.loads(l) for l in open(tmp_path / "q.quarantine.jsonl")]
    assert sorted(os.path.basename(x["file"]) for x in q) == sorted(cases)
