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
