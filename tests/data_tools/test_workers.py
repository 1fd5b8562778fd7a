"""``--workers N``: threads for .npy/.npz inputs, processes for line inputs (build.uses_processes), the same
bytes, errors and quarantine for any N, and a worker process that dies is one error, not a hang."""
import filecmp
import json
import multiprocessing
import os
import signal

import numpy as np
import pytest

from megaslm.vocab import UnitVocab

import data_tools.engine as E
from data_tools.build import build_dataset, uses_processes
from data_tools.errors import DataError
from data_tools.formats import InputSpec
from data_tools.streams import BuildOptions

from conftest import leftovers, write_jsonl

EXTS = (".bin", ".idx", ".lang.bin", ".lang.idx")
C = 500


def _same(a, b):
    for ext in EXTS:
        assert filecmp.cmp(a + ext, b + ext, shallow=False), ext
    ma, mb = (json.load(open(p + ".manifest.json")) for p in (a, b))
    assert ma == mb


def _binary_inputs(tmp_path, rng):
    """Two .npy + bounds and one .npz, languages mixed, records of 1-60 units."""
    paths = []
    for k in range(3):
        n = 700 + 50 * k
        lengths = rng.integers(1, 60, n)
        off = np.concatenate(([0], np.cumsum(lengths)))
        units = rng.integers(0, C, int(off[-1])).astype(np.int64 if k else np.int32)
        langs = np.where(rng.random(n) < 0.3, "fr", "en")
        if k == 1:
            p = tmp_path / f"z{k}.npz"
            np.savez(p, units=units, offsets=off, langs=langs)
        else:
            p = tmp_path / f"n{k}.npy"
            np.save(p, units)
            write_jsonl(tmp_path / f"n{k}.bounds.jsonl", [{"id": f"u{i}", "start": int(off[i]), "end": int(off[i + 1]),
                                                          "lang": str(langs[i])} for i in range(n)])
        paths.append(str(p))
    return paths


def test_workers_choose_threads_for_binary_inputs_and_processes_for_lines():
    def opts(**kw):
        return BuildOptions(vocab=UnitVocab(codebook_size=C), progress=False, **kw)

    npy, npz, jsonl = InputSpec.parse("a.npy"), InputSpec.parse("b.npz"), InputSpec.parse("c.jsonl")
    assert not uses_processes([npy, npz], opts(workers=4))
    assert uses_processes([npy, jsonl], opts(workers=2))
    assert not uses_processes([jsonl], opts(workers=1))         # one worker: this process, no pool at all


def test_binary_inputs_build_the_same_bytes_in_threads(tmp_path, monkeypatch):
    paths = _binary_inputs(tmp_path, np.random.default_rng(0))
    started = []
    real = E._Workers.__init__

    def spy(self, *a, **kw):
        started.append(a[1])
        real(self, *a, **kw)

    monkeypatch.setattr(E._Workers, "__init__", spy)
    vocab = UnitVocab(codebook_size=C, lang_tags=True)
    ref = str(tmp_path / "w1")
    build_dataset(paths, ref, vocab=vocab, mode="mono", lang="en", progress=False, chunk_size=37)
    for w in (2, 3):
        out = str(tmp_path / f"w{w}")
        build_dataset(paths, out, vocab=vocab, mode="mono", lang="en", progress=False, chunk_size=37, workers=w)
        _same(ref, out)
    assert started == []                                 # no worker process: threads converted the chunks
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": f"u{i}", "units": [i % C, 3]} for i in range(300)])
    build_dataset([src], str(tmp_path / "lines"), vocab=vocab, progress=False, chunk_size=50, workers=2)
    assert started == [2]                                # line inputs: 2 worker processes


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_bad_binary_input_is_the_same_error_and_quarantine_for_any_workers(tmp_path, kind):
    rng = np.random.default_rng(1)
    units = rng.integers(0, C, 30000)
    off = np.arange(0, 30001, 30)
    units[off[777] + 3] = C + 5                           # record 778 (1-based) holds a unit out of range
    if kind == "npz":
        src = str(tmp_path / "u.npz")
        np.savez(src, units=units, offsets=off)
    else:
        src = str(tmp_path / "u.npy")
        np.save(src, units)
        write_jsonl(tmp_path / "u.bounds.jsonl", [{"id": f"u{i}", "start": int(off[i]), "end": int(off[i + 1])}
                                                  for i in range(1000)])
    errors = []
    for w in (1, 2):
        with pytest.raises(DataError) as ei:
            build_dataset([src], str(tmp_path / f"bad{w}"), vocab=UnitVocab(codebook_size=C), progress=False,
                          chunk_size=64, workers=w)
        errors.append(str(ei.value))
        assert leftovers(tmp_path, f"bad{w}") == []
    assert errors[0] == errors[1] and ":778:" in errors[0] and "out of range" in errors[0], errors
    for w in (1, 2):
        m = build_dataset([src], str(tmp_path / f"skip{w}"), vocab=UnitVocab(codebook_size=C), progress=False,
                          chunk_size=64, workers=w, skip_bad=True)
        assert m["quarantine"]["count"] == 1 and m["documents"] == 999
    for ext in EXTS + (".quarantine.jsonl",):
        assert filecmp.cmp(str(tmp_path / "skip1") + ext, str(tmp_path / "skip2") + ext, shallow=False), ext


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_worker_process_that_dies_is_one_error_not_a_hang(tmp_path, monkeypatch, how):
    """A worker that exits or is killed (the OOM killer) mid-build: the build stops with one error naming how
    it died, leaves nothing at the prefix, and no worker process is left behind."""
    # fork, so that the planted failure below reaches the workers (a process holding torch uses a fork server)
    monkeypatch.setattr(E, "_pool_context", lambda: multiprocessing.get_context("fork"))
    real = E._pool_chunk

    def dies_at_chunk_3(job):
        if job[0] == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return real(job)

    monkeypatch.setattr(E, "_pool_chunk", dies_at_chunk_3)
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": f"u{i}", "units": [i % C, 1, 2]} for i in range(2000)])
    with pytest.raises(DataError) as ei:
        build_dataset([src], str(tmp_path / "ds"), vocab=UnitVocab(codebook_size=C), progress=False, chunk_size=100,
                      workers=2)
    expect = "killed by signal 9 (out of memory?)" if how == "kill" else "exit code 3"
    assert f"a build worker process died ({expect})" in str(ei.value), str(ei.value)
    assert leftovers(tmp_path, "ds") == []
    assert [p for p in multiprocessing.active_children() if p.name.startswith("data_tools-worker")] == []
