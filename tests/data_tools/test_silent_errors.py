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
