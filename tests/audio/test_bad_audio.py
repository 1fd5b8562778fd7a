"""Bad audio and manifests: one line naming the file, exit 2, nothing written; --skip-bad quarantines."""
import json
import os

import numpy as np
import pytest
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
    _truncated_copy(d / "good.wav", d / "truncated.wav")                   # a third of the declared data
    np.save(tmp_path / "km.npy", np.random.RandomState(0).randn(8, 32).astype(np.float32))
    tok = ["--tokenizer", "hubert", "--model-dir", models["hubert"], "--layer", "1", "--kmeans", str(tmp_path / "km.npy"),
           "-q"]
    cases = {
        "corrupt.wav": "unreadable audio", "empty.wav": "empty audio", "short.wav": "too short",
        "six.wav": "6 channels: expected mono or stereo",
        "truncated.wav": "truncated: the header declares 32000 bytes of audio data (1.00 s) but the file holds",
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


def _truncated_copy(src, dst, fraction=3):
    """The first 1/``fraction`` of ``src``'s bytes: a copy cut short (its header still declares the whole)."""
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:len(data) // fraction])


def test_truncated_audio_is_refused(tmp_path):
    """A WAV / AIFF whose data chunk declares more than the file holds: libsndfile reads what is there without
    an error (it clamps the frame count), so the check reads the header's chunk sizes; both the header pass
    and the decoder refuse it in one line naming the file. A streaming writer's open length (0xFFFFFFFF) and
    a chunk after the data are not truncations."""
    import struct

    from data_tools.audio.io import AudioError, audio_info, load_audio

    x = (0.1 * np.random.RandomState(0).randn(48000)).astype(np.float32)
    for fmt, ext, declared, present in (("WAV", "wav", 96000, 31970), ("AIFF", "aiff", 96008, 31972)):
        full = tmp_path / f"full.{ext}"
        sf.write(full, x, 16000, format=fmt, subtype="PCM_16")
        cut = tmp_path / f"cut.{ext}"
        _truncated_copy(full, cut)
        assert sf.info(str(cut)).frames < 48000       # libsndfile alone: a shorter file, no error
        expected = (f"{cut}: truncated: the header declares {declared} bytes of audio data (3.00 s) but the file "
                    f"holds {present} (1.00 s); expected the whole recording (a broken or partial copy?)")
        for read in (audio_info, lambda p: load_audio(p, 16000)):
            with pytest.raises(AudioError) as e:
                read(str(cut))
            assert str(e.value) == expected
        assert audio_info(str(full)) == (48000, 16000, 1) and load_audio(str(full), 16000).shape == (48000,)
    data = bytearray(open(tmp_path / "full.wav", "rb").read())
    k = data.find(b"data")
    open_len = bytearray(data)
    open_len[k + 4:k + 8] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "stream.wav").write_bytes(bytes(open_len))
    (tmp_path / "tail.wav").write_bytes(bytes(data) + b"LIST" + struct.pack("<I", 4) + b"abcd")
    for name in ("stream.wav", "tail.wav"):
        assert audio_info(str(tmp_path / name)) == (48000, 16000, 1)
