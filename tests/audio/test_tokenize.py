"""tokenize through the CLI: 1 and 2 ranks, batch compositions, direct model calls, frame counts, kill/resume."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import soundfile as sf

from conftest import ROOT, py, write_audio
from tests.distributed import free_port


def _torchrun(n, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "data_tools", *args]


def _read(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


def _mono_resampled(path, sr_out):
    from fractions import Fraction

    from scipy.signal import resample_poly
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(1)
    if sr != sr_out:
        r = Fraction(sr_out, sr)
        x = resample_poly(x, r.numerator, r.denominator).astype(np.float32)
    return x


def test_mimi_ranks_batches_direct(models, corpus, tmp_path):
    folder, rows = corpus
    man = os.path.join(folder, "manifest.csv")
    base = ["tokenize", "--manifest", man, "--tokenizer", "mimi", "--model-dir", models["mimi"], "-q"]
    r1 = py(["-m", "data_tools", *base, "-o", str(tmp_path / "one.jsonl"), "--shard-size", "5", "--batch-size", "3"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    r2 = subprocess.run(_torchrun(2, base + ["-o", str(tmp_path / "two.jsonl"), "--shard-size", "2", "--batch-size",
                                             "4", "--batch-seconds", "1.5"]),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = _read(tmp_path / "one.jsonl"), _read(tmp_path / "two.jsonl")
    assert one == two                                      # whatever the ranks, shards and batches
    assert [o["id"] for o in one] == [r["id"] for r in rows] and [o["lang"] for o in one] == [r["lang"] for r in rows]
    side = json.load(open(tmp_path / "one.units.json"))
    assert side["unit_source"].startswith("mimi:checkpoint=") and side["codebook_size"] == 64
    assert side["frame_rate"] == 12.5 and side["files"] == len(rows)

    import torch
    from transformers import MimiModel
    m = MimiModel.from_pretrained(models["mimi"]).eval()
    hop = 1920
    distinct = set()
    for o, row in zip(one, rows):
        x = _mono_resampled(os.path.join(folder, row["path"]), 24000)
        n = math.ceil(len(x) / hop)
        assert len(o["units"]) == n == math.ceil(row["seconds"] * 12.5 - 1e-6)   # duration x frame rate
        xp = np.pad(x, (0, n * hop - len(x)))
        with torch.no_grad():
            direct = m.encode(torch.from_numpy(xp)[None, None], num_quantizers=1).audio_codes[0, 0].tolist()
        assert o["units"] == direct                         # one-file model call
        distinct.update(direct)
    assert len(distinct) > 10                              # real variety, not one code


def test_hubert_kmeans_train_and_units(models, corpus, tmp_path):
    folder, rows = corpus
    km = str(tmp_path / "km.npy")
    r = py(["-m", "data_tools", "tokenize-kmeans-train", "--folder", folder, "--tokenizer", "hubert", "--model-dir",
            models["hubert"], "--layer", "2", "--clusters", "8", "-o", km, "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    cents = np.load(km)
    assert cents.shape == (8, 32) and cents.dtype == np.float32
    r = py(["-m", "data_tools", "tokenize", "--manifest", os.path.join(folder, "manifest.csv"), "--tokenizer",
            "hubert", "--model-dir", models["hubert"], "--layer", "2", "--kmeans", km, "-o", str(tmp_path / "h.jsonl"),
            "--batch-size", "5", "--dedup", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = _read(tmp_path / "h.jsonl")
    side = json.load(open(tmp_path / "h.units.json"))
    assert side["unit_source"].endswith(":dedup") and ":layer=2:" in side["unit_source"] and side["frame_rate"] == 50

    import torch
    from transformers import HubertModel
    m = HubertModel.from_pretrained(models["hubert"]).eval()
    for o, row in zip(out, rows):
        x = _mono_resampled(os.path.join(folder, row["path"]), 16000)
        with torch.no_grad():
            f = m(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states[2][0].numpy()
        direct = ((f[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
        assert abs(len(direct) - row["seconds"] * 50) <= 2  # duration x 50 Hz (conv front-end edges)
        assert sum(o["duration"]) == len(direct)
        assert np.repeat(o["units"], o["duration"]).tolist() == direct.tolist()
        assert all(a != b for a, b in zip(o["units"], o["units"][1:]))


@pytest.mark.parametrize("kind", ["hubert", "hubert_layer"])
def test_hubert_batch_composition(models, corpus, kind, tmp_path):
    """GroupNorm front-end runs per file, LayerNorm front-end batched: either way batch-independent."""
    from data_tools.audio.io import load_audio
    from data_tools.audio.tokenizers import load_tokenizer
    folder, rows = corpus
    np.save(tmp_path / "km.npy", np.random.RandomState(0).randn(16, 32).astype(np.float32))
    tok = load_tokenizer("hubert", models[kind], layer=1, kmeans=str(tmp_path / "km.npy"), device="cpu")
    waves = [load_audio(os.path.join(folder, r["path"]), 16000) for r in rows]
    alone = [tok.encode_batch([w])[0].tolist() for w in waves]
    together = [u.tolist() for u in tok.encode_batch(waves)]
    shuffled = tok.encode_batch(waves[::-1])[::-1]
    assert alone == together == [u.tolist() for u in shuffled]
    assert len({u for a in alone for u in a}) > 3


def test_kill_and_resume(models, tmp_path):
    folder = str(tmp_path / "audio")
    rows = write_audio(folder, n=40, seed=3)
    man = os.path.join(folder, "manifest.csv")
    base = ["tokenize", "--manifest", man, "--tokenizer", "mimi", "--model-dir", models["mimi"], "-q",
            "--shard-size", "10", "--batch-size", "1"]
    ref = py(["-m", "data_tools", *base, "-o", str(tmp_path / "ref.jsonl")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = str(tmp_path / "run.jsonl")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen(_torchrun(2, base + ["-o", out]), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    tree = []
    try:
        while time.time() < deadline:
            parts = glob.glob(out + ".work/shard-*.part.jsonl")
            if any(os.path.getsize(f) > 0 for f in parts):
                break
            assert p.poll() is None, "the run ended before it could be killed"
            time.sleep(0.002)
        # torchrun starts its workers in sessions of their own: kill -9 the whole tree we started, at once
        tree = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
        for proc in tree:
            proc.send_signal(signal.SIGKILL)
    finally:
        p.wait()
        psutil.wait_procs(tree, timeout=30)
    assert not os.path.exists(out), "killed before the merge: no output"
    logs_before = set(glob.glob(out + ".work/log.*.txt"))
    before = []                                            # files recorded (finished shards + complete part lines)
    for f in glob.glob(out + ".work/shard-*.jsonl"):
        before += [json.loads(l)["i"] for l in open(f).read().split("\n")[:-1]]
    assert 0 < len(before) < len(rows)
    r = subprocess.run(_torchrun(2, base + ["-o", out]), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(out).read() == open(tmp_path / "ref.jsonl").read()
    after = [int(l) for f in set(glob.glob(out + ".work/log.*.txt")) - logs_before for l in open(f)]
    # the re-run encoded exactly the files the kill left unrecorded, each once (recorded ones never twice)
    assert sorted(before + after) == list(range(len(rows)))
