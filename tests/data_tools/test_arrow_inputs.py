"""Hugging Face dataset inputs (data_tools/arrow_inputs.py): parquet, Arrow IPC (stream and file) and save_to_disk
folders build to the same bytes as the JSONL of the same units, with the same errors and quarantine; an input
whose format is not recognised is one line. The layouts are written with pyarrow itself, as ``datasets`` writes
them (``datasets`` is not a dependency)."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.build import build_dataset
from data_tools.cli import main
from data_tools.errors import DataError
from data_tools.formats import InputSpec
from data_tools.arrow_inputs import TableOptions

N = 700


def _rows(seed=0, n=N):
    rng = np.random.default_rng(seed)
    units = [rng.integers(0, 128, int(rng.integers(1, 40))).tolist() for _ in range(n)]
    return {"file_name": [f"a/{i:04d}.flac" for i in range(n)], "units": units,
            "lang": [("en", "fr", None)[i % 3] for i in range(n)],
            "duration": [[1 + (j % 2) for j in range(len(u))] for u in units],
            "speaker": [f"s{i % 4}" for i in range(n)]}


def _jsonl(path, cols):
    with open(path, "w") as f:
        for i in range(len(cols["file_name"])):
            o = {k: v[i] for k, v in cols.items() if v[i] is not None}
            f.write(json.dumps(o) + "\n")
    return str(path)


def _table(cols):
    return pa.table({k: (pa.array(v, pa.list_(pa.int16())) if k == "units" else v) for k, v in cols.items()})


def _stream(path, table, chunk=250):
    with pa.OSFile(str(path), "wb") as f:
        w = pa.ipc.new_stream(f, table.schema)
        w.write_table(table, max_chunksize=chunk)
        w.close()


def save_to_disk(folder, table):
    """The folder ``datasets.Dataset.save_to_disk`` writes: dataset_info.json, state.json, one arrow stream shard."""
    os.makedirs(folder)
    _stream(os.path.join(folder, "data-00000-of-00001.arrow"), table)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"citation": "", "description": "", "features": {}, "homepage": "", "license": ""}, f)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0123456789abcdef",
                   "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                   "_output_all_columns": False, "_split": None}, f)
    return str(folder)


def _files(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".lang.bin", ".lang.idx")]


def _build(inp, out, **kw):
    from data_tools.streams import BuildOptions
    from megaslm.vocab import UnitVocab
    opts = BuildOptions(vocab=UnitVocab(codebook_size=128, dedup=kw.pop("dedup", False)), chunk_size=64,
                        progress=False, **kw)
    return build_dataset([inp], out, opts)


def test_parquet_arrow_and_save_to_disk_build_the_jsonl_bytes(tmp_path, monkeypatch):
    cols = _rows()
    ref = _build(_jsonl(tmp_path / "u.jsonl", cols), str(tmp_path / "ref"))
    t = _table(cols)
    pq.write_table(t, tmp_path / "u.parquet", row_group_size=300)
    _stream(tmp_path / "u.arrow", t)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as f:             # the IPC *file* format
        with pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t, max_chunksize=200)
    ds = save_to_disk(tmp_path / "ds", t)
    for name in ("u.parquet", "u.arrow", "f.arrow", "ds"):
        for record_path in ("0", "1"):
            monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", record_path)
            m = _build(str(tmp_path / name), str(tmp_path / f"o_{name}_{record_path}"))
            assert _files(str(tmp_path / f"o_{name}_{record_path}")) == _files(str(tmp_path / "ref")), name
            for k in ("documents", "hours", "units_in", "content_hash"):
                assert m[k] == ref[k], (name, k)
            assert m["tokens"]["per_language"] == ref["tokens"]["per_language"]
            assert m["ignored_fields"] == {str(tmp_path / name): ["speaker"]}
    monkeypatch.delenv("DATA_TOOLS_RECORD_PATH")
    # dedup, and a save_to_disk DatasetDict: its train split by default, --split, ambiguity refused
    _build(_jsonl(tmp_path / "u.jsonl", cols), str(tmp_path / "refd"), dedup=True)
    dd = tmp_path / "dd"
    save_to_disk(dd / "train", t)
    save_to_disk(dd / "test", _table(_rows(1, 50)))
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    _build(str(dd), str(tmp_path / "o_dd"), dedup=True)
    assert _files(str(tmp_path / "o_dd")) == _files(str(tmp_path / "refd"))
    from data_tools.streams import BuildOptions
    from megaslm.vocab import UnitVocab
    m = build_dataset([InputSpec.parse(str(dd), table=TableOptions(split="test"))], str(tmp_path / "o_t"),
                      BuildOptions(vocab=UnitVocab(codebook_size=128), progress=False))
    assert m["documents"] == 50
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["valid", "test"]}))
    with pytest.raises(DataError, match=r"no split 'train': the DatasetDict has \['valid', 'test'\]; choose one "
                                        r"with --split"):
        _build(str(dd), str(tmp_path / "o_amb"))


def test_errors_and_quarantine_are_the_jsonl_ones(tmp_path, capsys):
    cols = _rows(2, 40)
    cols["units"][5] = cols["units"][5][:2] + [200]         # out of range
    cols["units"][9] = []                                  # empty
    cols["lang"][12] = "de"                                # unknown language
    t = pa.table({**{k: v for k, v in cols.items() if k != "units"}, "units": pa.array(cols["units"],
                                                                                      pa.list_(pa.int64()))})
    pq.write_table(t, tmp_path / "bad.parquet")
    jl = _jsonl(tmp_path / "bad.jsonl", cols)
    msgs = []
    for inp in (jl, str(tmp_path / "bad.parquet")):
        assert main(["build", "-i", inp, "-o", str(tmp_path / "o"), "--codebook-size", "128", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and not os.path.exists(tmp_path / "o.bin")
        msgs.append(err.replace(inp, "IN"))
    assert msgs[0] == msgs[1] == "error: IN:6: field 'units[2]': unit 200 out of range [0, 128)"
    quarantines = []
    for k, inp in enumerate((jl, str(tmp_path / "bad.parquet"))):
        out = str(tmp_path / f"q{k}")
        assert main(["build", "-i", inp, "-o", out, "--codebook-size", "128", "-q", "--skip-bad"]) == 0
        quarantines.append([{**json.loads(l), "input": None, "message": json.loads(l)["message"].replace(inp, "IN")}
                            for l in open(out + ".quarantine.jsonl")])
    assert quarantines[0] == quarantines[1] and [q["line"] for q in quarantines[0]] == [6, 10, 13]
    assert _files(str(tmp_path / "q0")) == _files(str(tmp_path / "q1"))
    # a unit column under another name: named in the message; a missing one: one line naming the columns
    pq.write_table(t.rename_columns([c if c != "units" else "hubert_units" for c in t.column_names]),
                   tmp_path / "h.parquet")
    assert main(["build", "-i", str(tmp_path / "h.parquet"), "-o", str(tmp_path / "o"), "--codebook-size", "128",
                 "-q", "--unit-column", "hubert_units"]) == 2
    assert capsys.readouterr().err.endswith(":6: field 'hubert_units[2]': unit 200 out of range [0, 128)\n")
    assert main(["build", "-i", str(tmp_path / "h.parquet"), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no unit column: expected one of ['units', 'audio_repr']" in err


def test_slamkit_audio_repr_column(tmp_path):
    cols = _rows(3, 30)
    reprs = ["".join(f"<Un{u}>" for u in us) for us in cols["units"]]
    pq.write_table(pa.table({"file_name": cols["file_name"], "audio_repr": reprs}), tmp_path / "s.parquet")
    _build(_jsonl(tmp_path / "s.jsonl", {"file_name": cols["file_name"], "audio_repr": reprs}), str(tmp_path / "a"))
    _build(str(tmp_path / "s.parquet"), str(tmp_path / "b"))
    assert _files(str(tmp_path / "a")) == _files(str(tmp_path / "b"))
    # slamkit's extract_features {units, duration} struct (float frame counts): the JSONL utterances' hours
    dur = [[0.5 + (j % 3) for j in range(len(u))] for u in cols["units"]]
    struct = pa.array([{"units": u, "duration": d} for u, d in zip(cols["units"], dur)])
    pq.write_table(pa.table({"file_name": cols["file_name"], "audio_repr": struct}), tmp_path / "x.parquet")
    ref = _build(_jsonl(tmp_path / "x.jsonl", {"file_name": cols["file_name"], "units": cols["units"],
                                               "duration": dur}), str(tmp_path / "c"))
    for record_path in ("0", "1"):
        os.environ["DATA_TOOLS_RECORD_PATH"] = record_path
        try:
            m = _build(str(tmp_path / "x.parquet"), str(tmp_path / f"d{record_path}"))
        finally:
            del os.environ["DATA_TOOLS_RECORD_PATH"]
        assert _files(str(tmp_path / "c")) == _files(str(tmp_path / f"d{record_path}")) and m["hours"] == ref["hours"]


@pytest.mark.parametrize("name,head", [("x.xyz", b"\x00\x01binary"), ("p.bin", None), ("folder", None),
                                       ("bad.parquet", b"PAR1 cut short"), ("bad.arrow", b"\xff\xff\xff\xffxx")])
def test_unrecognised_format_is_one_line(tmp_path, capsys, name, head):
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif head is None:
        pq.write_table(pa.table({"x": [1]}), path)         # a parquet file named .bin: read as parquet
    else:
        path.write_bytes(head)
    assert main(["build", "-i", str(path), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ")
    if name == "p.bin":
        assert "no unit column" in err                    # recognised by content, refused for its columns
    elif name.startswith("bad."):
        assert f"cannot read as {'parquet' if name.endswith('parquet') else 'Arrow IPC'} (" in err
    else:
        assert "expected JSONL (.jsonl/.json), .npy (+ .bounds.jsonl), .npz, parquet (.parquet), Arrow IPC" in err
