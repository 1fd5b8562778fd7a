"""Issue 25 items 1-2: inputs that used to build a wrong dataset (or fail with a wrong message) now fail with
one line naming the file (and line or field) and what was expected, exit 2, and nothing under the output."""
import os

import numpy as np
import pytest

from data_tools.cli import main

from conftest import leftovers, read_docs, write_jsonl


def cli(capfd, *args):
    """``python -m data_tools build ...`` in this process: (exit code, stderr without the import warnings)."""
    rc = main(["build", *args, "-q"])
    err = capfd.readouterr().err
    return rc, "".join(l for l in err.splitlines(True) if "warn" not in l.lower())


def one_line_error(rc, err, *parts):
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for p in parts:
        assert p in err, (p, err)


def npy_input(tmp_path, units, ranges, name="u"):
    np.save(tmp_path / f"{name}.npy", units)
    write_jsonl(tmp_path / f"{name}.bounds.jsonl", [{"id": f"r{i}", "start": a, "end": b} for i, (a, b) in enumerate(ranges)])
    return str(tmp_path / f"{name}.npy")


# ---- item 1: signed dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", ">i2"])
def test_negative_units_of_every_signed_dtype_are_refused(tmp_path, capfd, dtype):
    """An int8 -5 used to read as unit 251 (an unsigned view), pass the range check and build [7 254 9 2]."""
    src = npy_input(tmp_path, np.array([1, 2, 3, 4, -5, 6], dtype), [(0, 3), (3, 6)])
    out = tmp_path / "out"
    rc, err = cli(capfd, "-i", src, "-o", str(out / "ds"), "--mode", "mono", "--lang", "en")
    one_line_error(rc, err, "u.bounds.jsonl:2: field 'units[1]': negative unit -5")
    assert not out.exists() or leftovers(out, "ds") == []


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", ">i4", "<u2"])
def test_every_integer_dtype_builds_its_values(tmp_path, dtype):
    from data_tools.build import build_dataset
    from megaslm.vocab import UnitVocab
    top = min(np.iinfo(np.dtype(dtype)).max, 999)
    units = np.array([0, 1, 2, top, 5, 7, 100], dtype)
    src = npy_input(tmp_path, units, [(0, 4), (4, 7)])
    vocab = UnitVocab(codebook_size=1000)
    build_dataset([src], str(tmp_path / "ds"), vocab=vocab, progress=False)
    docs = read_docs(str(tmp_path / "ds"))
    assert [d[0].tolist() for d in docs] == [[u + vocab.offset for u in units[:4].tolist()] + [vocab.eod_id],
                                             [u + vocab.offset for u in units[4:].tolist()] + [vocab.eod_id]]


def test_uint64_unit_above_int64_is_out_of_range_not_negative(tmp_path, capfd):
    src = npy_input(tmp_path, np.array([1, 2, 2 ** 64 - 1], np.uint64), [(0, 1), (1, 3)])
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"))
    one_line_error(rc, err, "u.bounds.jsonl:2: field 'units[1]': unit 18446744073709551615 out of range [0, 2048)")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bool", "complex64"])
def test_non_integer_npy_names_the_npy_not_the_sidecar(tmp_path, capfd, dtype):
    src = npy_input(tmp_path, np.array([1, 0, 1, 1], dtype), [(0, 2), (2, 4)])
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--skip-bad")
    one_line_error(rc, err, f"error: {src}: expected integer units (int8, int16, int32, int64, uint8, uint16, "
                            f"uint32 or uint64), got dtype {dtype}")
    assert "bounds" not in err
    assert leftovers(tmp_path, "ds") == []


def test_non_integer_npz_units_name_the_npz(tmp_path, capfd):
    np.savez(tmp_path / "z.npz", units=np.array([1.0, 2.0]), offsets=np.array([0, 2]))
    rc, err = cli(capfd, "-i", str(tmp_path / "z.npz"), "-o", str(tmp_path / "ds"))
    one_line_error(rc, err, f"{tmp_path / 'z.npz'}: field 'units': expected integer units", "got dtype float64")


# ---- item 1: integers beyond 64 bits -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,msg", [
    ('{"file_name": "x", "units": [1, 1180591620717411303424]}', "field 'units[1]': unit 1180591620717411303424 out of range [0, 2048)"),
    ('{"file_name": "x", "units": [1, -1180591620717411303424]}', "field 'units[1]': negative unit -1180591620717411303424"),
    ('{"file_name": "x", "units": [1, 18446744073709551616]}', "field 'units[1]': unit 18446744073709551616 out of range"),
    ('{"file_name": "x", "units": [1, 1e21]}', "field 'units[1]': unit 1e+21 is not an integer"),
    ('{"id": "s", "en": [[1], [2, 1180591620717411303424]], "fr": [[3], [4]]}', "field 'en[1][1]': unit 1180591620717411303424 out of range"),
])
def test_integer_beyond_64_bits_is_out_of_range(tmp_path, capfd, text, msg):
    """orjson reads 2**70 as the float 1.1805916207174113e+21: it was reported as 'not an integer'."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"file_name": "ok", "units": [1, 2]}, text])
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--mode", "random")
    one_line_error(rc, err, f"{src}:2: {msg}")
    assert leftovers(tmp_path, "ds") == []


def test_bounds_beyond_64_bits_are_out_of_range(tmp_path, capfd):
    np.save(tmp_path / "u.npy", np.arange(6))
    (tmp_path / "u.bounds.jsonl").write_text('{"start": 0, "end": 3}\n{"start": 3, "end": 1180591620717411303424}\n')
    rc, err = cli(capfd, "-i", str(tmp_path / "u.npy"), "-o", str(tmp_path / "ds"))
    one_line_error(rc, err, "u.bounds.jsonl:2: field 'end': bad boundaries [3, 1180591620717411303424) for 6 units")


# ---- item 1: .bounds.jsonl ranges that overlap or leave gaps -----------------------------------------------------

BOUNDS_CASES = {
    # name: (ranges over 20 units, line, field, message)
    "overlap": ([(0, 10), (5, 15), (15, 20)], 2, "start",
                "5 overlaps the previous record's range, which ends at 10; expected 10 (ranges follow the sidecar's "
                "order without overlapping)"),
    "out_of_order": ([(10, 20), (0, 10)], 2, "start", "0 overlaps the previous record's range, which ends at 20"),
    "gap": ([(0, 10), (12, 20)], 2, "start",
            "12 leaves units [10, 12) of {npy} in no record; expected 10 (--allow-gaps to skip units)"),
    "leading_gap": ([(2, 10), (10, 20)], 1, "start", "2 leaves units [0, 2) of {npy} in no record; expected 0"),
    "trailing_gap": ([(0, 10), (10, 18)], 2, "end",
                     "18 leaves units [18, 20) of {npy} in no record; expected 20, the end of {npy} (--allow-gaps to "
                     "skip units)"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(BOUNDS_CASES))
def test_bounds_must_tile_the_array(tmp_path, capfd, case, workers):
    """Overlapping ranges (0-10, 5-15) wrote units 5-9 twice, and gaps dropped units, with exit code 0."""
    ranges, line, field, msg = BOUNDS_CASES[case]
    src = npy_input(tmp_path, np.arange(20), ranges)
    bounds = src[:-4] + ".bounds.jsonl"
    out = tmp_path / "out"
    rc, err = cli(capfd, "-i", src, "-o", str(out / "ds"), "--workers", str(workers), "--skip-bad")
    one_line_error(rc, err, f"error: {bounds}:{line}: field '{field}': " + msg.format(npy=src))
    assert not out.exists() or leftovers(out, "ds") == []


def test_overlap_is_refused_with_allow_gaps_and_gaps_are_allowed(tmp_path, capfd):
    src = npy_input(tmp_path, np.arange(20), [(0, 10), (5, 15)])
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--allow-gaps")
    one_line_error(rc, err, "u.bounds.jsonl:2: field 'start': 5 overlaps the previous record's range, which ends at "
                            "10; expected at least 10")
    src = npy_input(tmp_path, np.arange(20), [(2, 5), (8, 10), (10, 12)], name="g")
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--allow-gaps")
    assert rc == 0, err
    assert [d[0].tolist() for d in read_docs(str(tmp_path / "ds"))] == [[u + 3 for u in r] + [2] for r in
                                                                         ([2, 3, 4], [8, 9], [10, 11])]


def test_empty_sidecar_leaves_every_unit_out(tmp_path, capfd):
    src = npy_input(tmp_path, np.arange(20), [])
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"file_name": "a", "units": [1]}])
    rc, err = cli(capfd, "-i", ok, "-i", src, "-o", str(tmp_path / "ds"))
    one_line_error(rc, err, f"{src[:-4]}.bounds.jsonl: no record: units [0, 20) of {src} are in none; expected "
                            f"ranges covering them (--allow-gaps to skip units)")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("where", ["inside", "between"])
def test_overlap_across_chunks_and_converters(tmp_path, capfd, workers, where):
    """Chunks are converted apart (threads, or worker processes when a line input is present): the build
    checks each chunk's first range against the previous chunk's last, and names the line."""
    from data_tools.build import LOCAL_BINARY_CHUNK_FACTOR
    from data_tools.formats import BINARY_CHUNK_FACTOR, InputSpec, iter_chunk_ranges
    n = 3000
    off = np.arange(n + 1) * 3
    ranges = [(int(off[i]), int(off[i + 1])) for i in range(n)]
    src = npy_input(tmp_path, np.arange(off[-1]) % 100, ranges)
    factor = BINARY_CHUNK_FACTOR if workers == 2 else LOCAL_BINARY_CHUNK_FACTOR
    firsts = [first for _, first, _ in iter_chunk_ranges([InputSpec(src, "u")], 16, factor)]
    assert len(firsts) > 4
    bad = firsts[3] - 1 + (0 if where == "between" else 7)   # the first record of a chunk, or one inside it
    ranges[bad] = (ranges[bad][0] - 1, ranges[bad][1])
    src = npy_input(tmp_path, np.arange(off[-1]) % 100, ranges)
    extra = ["-i", write_jsonl(tmp_path / "l.jsonl", [{"file_name": "a", "units": [1]}])] if workers == 2 else []
    rc, err = cli(capfd, *extra, "-i", src, "-o", str(tmp_path / "ds"), "--workers", str(workers),
                  "--chunk-size", "16")
    one_line_error(rc, err, f"u.bounds.jsonl:{bad + 1}: field 'start': {ranges[bad][0]} overlaps the previous "
                            f"record's range, which ends at {ranges[bad][0] + 1}")
    assert leftovers(tmp_path, "ds") == []


# ---- item 2: memory bounded by the chunk, not the file; a line longer than the maximum is named ------------------

MiB = 1 << 20
# the bound docs/data_tools.md states: each process of a build stays below its interpreter and libraries (R0,
# measured here by a tiny build) + MEM_FACTOR x its largest chunk + MEM_EXTRA (a hash window, the cutter's
# pages); a chunk of a line file holds at most --max-line-bytes + 1 bytes
MEM_FACTOR, MEM_EXTRA = 20, 24 * MiB


def peak_rss(*args):
    """(exit code, stderr, peak RSS in bytes of the build and any worker process of it): the build runs in
    a child of a fresh interpreter, which reads getrusage(RUSAGE_CHILDREN) once it has waited for it (this
    test process's own children would mix in earlier tests' builds)."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import json, resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'data_tools', 'build', *sys.argv[1:], '-q'], capture_output=True, text=True); "
            "print(json.dumps([r.returncode, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    rc, err, rss = json.loads(r.stdout)
    return rc, "".join(l for l in err.splitlines(True) if "warn" not in l.lower()), rss


@pytest.fixture(scope="module")
def base_rss(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    src = write_jsonl(d / "t.jsonl", [{"file_name": "a", "units": [1, 2]}])
    rc, err, rss = peak_rss("-i", src, "-o", str(d / "ds"))
    assert rc == 0, err
    return rss


@pytest.mark.parametrize("workers", [1, 2])
def test_one_huge_line_of_nul_bytes_is_named_in_bounded_memory(tmp_path, base_rss, workers):
    """A 2 GiB file of NUL bytes (one "line") ran 40 s to 4.2 GB RSS and ended with 'input changed while
    building' (it had not). Planted here: a 1 GiB sparse file (instant), --max-line-bytes 4M."""
    src = tmp_path / "nul.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"file_name": "a", "units": [1]}\n')
        f.truncate(1 << 30)
    out = tmp_path / "out"
    rc, err, rss = peak_rss("-i", str(src), "-o", str(out / "ds"), "--max-line-bytes", "4M", "--workers", str(workers))
    one_line_error(rc, err, f"error: {src}:2: line longer than 4,194,304 bytes; expected one JSON record per line, "
                            f"at most --max-line-bytes 4194304")
    assert "changed" not in err
    assert not out.exists() or leftovers(out, "ds") == []
    assert rss <= base_rss + MEM_FACTOR * (4 * MiB + 1) + MEM_EXTRA, (rss / MiB, base_rss / MiB)


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_is_a_multiple_of_the_chunk_not_of_the_file(tmp_path, base_rss, workers):
    """A valid file of lines just under a lowered --max-line-bytes (stories, the record path, whose Python
    objects cost the most per byte; utterances, the vectorised path), larger than the stated bound: the
    build's peak RSS stays under the bound."""
    import json
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2048, 90_000)
    story = json.dumps({"id": "s", "en": [u[i:i + 500].tolist() for i in range(0, u.size, 500)],
                        "fr": [u[i:i + 500].tolist() for i in range(0, u.size, 500)]})
    utt = json.dumps({"file_name": "u", "units": rng.integers(0, 2048, 182_000).tolist()})
    limit = MiB
    assert limit * 0.9 < len(story) < limit and limit * 0.9 < len(utt) < limit
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for k in range(72):
            f.write((story if k % 4 == 0 else utt) + "\n")
    bound = MEM_FACTOR * (limit + 1) + MEM_EXTRA
    assert os.path.getsize(src) > bound + 20 * MiB         # memory that grew with the file would show
    rc, err, rss = peak_rss("-i", str(src), "-o", str(tmp_path / "ds"), "--max-line-bytes", str(limit),
                            "--workers", str(workers), "--mode", "random")
    assert rc == 0, err
    print(f"peak RSS {rss / MiB:.1f} MiB, base {base_rss / MiB:.1f} MiB, bound {(base_rss + bound) / MiB:.1f} MiB, "
          f"file {os.path.getsize(src) / MiB:.1f} MiB")
    assert rss <= base_rss + bound, (rss / MiB, base_rss / MiB, bound / MiB)


def test_long_lines_cut_alone_build_the_same_bytes(tmp_path):
    """A line longer than the step gets a chunk of its own: the output does not depend on it."""
    from data_tools.build import build_dataset
    rng = np.random.default_rng(1)
    recs = [{"file_name": f"u{i}", "units": rng.integers(0, 2048, int(n)).tolist()}
            for i, n in enumerate(rng.choice([3, 40, 3000], size=300, p=[0.45, 0.45, 0.1]))]
    recs += [{"id": f"s{i}", "en": [[1, 2], [3] * 900], "fr": [[4], [5] * 800]} for i in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", rng.permutation(np.array(recs, dtype=object)).tolist())
    for name, kw in (("ref", {}), ("small", {"max_line_bytes": 20_000, "chunk_size": 50}), ("w2", {"max_line_bytes": 20_000, "workers": 2})):
        build_dataset([src], str(tmp_path / name), mode="random", progress=False, **kw)
    for ext in (".bin", ".idx", ".lang.bin", ".lang.idx"):
        assert (tmp_path / f"small{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
        assert (tmp_path / f"w2{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_max_line_bytes_in_every_reader(tmp_path, capfd):
    """The limit applies to .bounds.jsonl sidecars too, to a line that is not the first, to the last line
    without its newline, and to bpe-train's reader (formats.iter_chunks)."""
    from data_tools.errors import DataError
    from data_tools.formats import InputSpec, iter_chunks
    long = '{"file_name": "x", "units": [' + ", ".join(["7"] * 400) + "]}"
    src = write_jsonl(tmp_path / "a.jsonl", [{"file_name": "a", "units": [1]}] * 50 + [long] + [{"file_name": "b", "units": [2]}])
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--max-line-bytes", "1000", "--chunk-size", "4")
    one_line_error(rc, err, f"error: {src}:51: line longer than 1,000 bytes")
    rc, err = cli(capfd, "-i", src, "-o", str(tmp_path / "ds"), "--max-line-bytes", str(len(long)), "--chunk-size", "4")
    assert rc == 0, err
    (tmp_path / "b.jsonl").write_text('{"file_name": "a", "units": [1]}\n' + long)       # no newline at the end
    rc, err = cli(capfd, "-i", str(tmp_path / "b.jsonl"), "-o", str(tmp_path / "ds"), "--max-line-bytes", str(len(long) - 1))
    one_line_error(rc, err, f"{tmp_path / 'b.jsonl'}:2: line longer than {len(long) - 1:,} bytes")
    np.save(tmp_path / "n.npy", np.arange(10))
    (tmp_path / "n.bounds.jsonl").write_text('{"start": 0, "end": 5}\n{"start": 5, "end": 10, "pad": "' + "x" * 3000 + '"}\n')
    rc, err = cli(capfd, "-i", str(tmp_path / "n.npy"), "-o", str(tmp_path / "ds"), "--max-line-bytes", "2000")
    one_line_error(rc, err, f"error: {tmp_path / 'n.bounds.jsonl'}:2: line longer than 2,000 bytes")
    with pytest.raises(DataError, match=r"a\.jsonl:51: line longer than 1,000 bytes"):
        list(iter_chunks([InputSpec(src, "a")], 16, max_line_bytes=1000))
    assert sum(len(c[2]) for c in iter_chunks([InputSpec(src, "a")], 16, max_line_bytes=len(long))) == 52


def test_short_reads_are_read_on_not_blamed_on_the_input(tmp_path, monkeypatch):
    """One read returns at most ~2 GiB on Linux: a short read is read on, not 'input changed while building'."""
    import data_tools.build as build
    from data_tools.build import build_dataset
    rng = np.random.default_rng(2)
    src = write_jsonl(tmp_path / "in.jsonl", [{"file_name": f"u{i}", "units": rng.integers(0, 2048, 50).tolist()}
                                              for i in range(400)])
    build_dataset([src], str(tmp_path / "ref"), progress=False)
    real = os.pread
    monkeypatch.setattr(build.os, "pread", lambda fd, n, off: real(fd, min(n, 777), off))
    build_dataset([src], str(tmp_path / "short"), progress=False)
    for ext in (".bin", ".idx", ".lang.bin", ".lang.idx"):
        assert (tmp_path / f"short{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_an_input_that_did_change_is_named(tmp_path, monkeypatch):
    import data_tools.build as build
    from data_tools.build import build_dataset
    from data_tools.errors import DataError
    src = write_jsonl(tmp_path / "in.jsonl", [{"file_name": f"u{i}", "units": [1, 2, 3]} for i in range(100)])
    real = build._read_range

    def truncate_then_read(chunk):
        os.truncate(src, 100)
        return real(chunk)
    monkeypatch.setattr(build, "_read_range", truncate_then_read)
    with pytest.raises(DataError, match=r"in\.jsonl: input changed while building: bytes 0-\d+ no longer hold the "
                                        r"100 lines they held when the build cut the file; expected it unchanged"):
        build_dataset([src], str(tmp_path / "ds"), progress=False)


def test_skip_bad_quarantines_records_without_breaking_the_tiling(tmp_path, capfd):
    """--skip-bad: a record with bad units still covers its range; one whose range cannot be read (invalid
    JSON) leaves the next start unchecked. Neither is reported as a gap or an overlap."""
    from megaslm.vocab import read_manifest
    units = np.arange(30) % 50
    units[12] = 5000                                    # record 3 (units 10-15): out of range
    np.save(tmp_path / "u.npy", units)
    (tmp_path / "u.bounds.jsonl").write_text('{"start": 0, "end": 5}\n{"start": 5, "end": 10\n{"start": 10, "end": 15}\n'
                                             '{"start": 15, "end": 30}\n')
    rc, err = cli(capfd, "-i", str(tmp_path / "u.npy"), "-o", str(tmp_path / "ds"), "--skip-bad")
    assert rc == 0, err
    assert read_manifest(str(tmp_path / "ds"))["quarantine"]["count"] == 2
    assert [len(d[0]) for d in read_docs(str(tmp_path / "ds"))] == [6, 16]
