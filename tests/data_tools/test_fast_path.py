"""The vectorised utterance path (data_tools.fast) writes exactly the bytes of the record-by-record path,
refuses (falls back on) anything that is not plain JSON integers, and keeps worker-count independence."""
import filecmp
import json

import numpy as np
import pytest

from megaslm.vocab import UnitVocab

from data_tools.build import build_dataset
from data_tools.intparse import parse_int_lists

from conftest import write_jsonl

EXTS = (".bin", ".idx", ".lang.bin", ".lang.idx", ".manifest.json")


def _same(a, b):
    for ext in EXTS:
        if ext == ".manifest.json":
            ma, mb = json.load(open(a + ext)), json.load(open(b + ext))
            for m in (ma, mb):
                m.pop("inputs")
            assert ma == mb
        else:
            assert filecmp.cmp(a + ext, b + ext, shallow=False), ext


def _utterances(rng, n, C):
    out = []
    for i in range(n):
        u = rng.integers(0, C, size=int(rng.integers(1, 40)))
        if i % 7 == 0:
            u[: len(u) // 2] = u[0]                      # runs, for dedup
        r = {"file_name": f"u{i}.flac", "units": u.tolist()}
        if i % 3 == 0:
            r["lang"] = "fr"
        if i % 5 == 0:
            r["duration"] = [1.5] * len(u)
        out.append(r)
    return out


@pytest.mark.parametrize("dedup,bos,tags", [(False, False, False), (True, True, False), (False, True, True),
                                            (False, False, True)])
def test_fast_path_equals_record_path(tmp_path, monkeypatch, dedup, bos, tags):
    rng = np.random.default_rng(0)
    C = 2048
    recs = _utterances(rng, 600, C)
    lines = [json.dumps(r) if i % 2 else json.dumps(r, separators=(",", ":")) for i, r in enumerate(recs)]
    lines.insert(10, "")                                  # a blank line keeps the numbering
    src = write_jsonl(tmp_path / "u.jsonl", lines)
    # slamkit tokenised lines, .npy + bounds, .npz: the same utterances
    rep = write_jsonl(tmp_path / "rep.jsonl", [{"file_name": r["file_name"], "audio_repr": "".join(
        f"<Un{u}>" for u in r["units"]), "lang": r.get("lang", "en")} for r in recs])
    units = np.concatenate([np.array(r["units"]) for r in recs]).astype(np.int32)
    off = np.concatenate(([0], np.cumsum([len(r["units"]) for r in recs])))
    np.save(tmp_path / "n.npy", units)
    write_jsonl(tmp_path / "n.bounds.jsonl", [{"id": str(i), "start": int(off[i]), "end": int(off[i + 1]),
                                                "lang": r.get("lang", "en")} for i, r in enumerate(recs)])
    np.savez(tmp_path / "z.npz", units=units, offsets=off, langs=np.array([r.get("lang", "en") for r in recs]))
    # tags: language tags + separator (an interleaving vocabulary): each utterance opens with its tag
    vocab = UnitVocab(codebook_size=C, dedup=dedup, lang_tags=tags, sentence_sep=tags)
    import data_tools.fast as fast
    taken = []
    for name in ("jsonl_chunk", "npy_chunk", "npz_chunk"):
        def spy(*a, _f=getattr(fast, name), _n=name):
            r = _f(*a)
            taken.append((_n, r is not None))
            return r
        monkeypatch.setattr(fast, name, spy)
    inputs = [src, rep, str(tmp_path / "n.npy"), str(tmp_path / "z.npz")]
    for k, inp in enumerate(inputs):
        common = dict(vocab=vocab, add_bos=bos, progress=False, chunk_size=64)
        build_dataset([inp], str(tmp_path / f"fast{k}"), **common)
        build_dataset([inp], str(tmp_path / f"fast2w{k}"), workers=2, **{**common, "chunk_size": 50})
        monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", "1")
        build_dataset([inp], str(tmp_path / f"slow{k}"), **common)
        monkeypatch.delenv("DATA_TOOLS_RECORD_PATH")
        _same(str(tmp_path / f"fast{k}"), str(tmp_path / f"slow{k}"))
        _same(str(tmp_path / f"fast{k}"), str(tmp_path / f"fast2w{k}"))
    # the vectorised path really ran (and vouched for every chunk) for each format
    assert {n for n, ok in taken if ok} == {"jsonl_chunk", "npy_chunk", "npz_chunk"}
    assert all(ok for _, ok in taken)
    for k in (1, 2):                                      # the unit stream does not depend on the format
        for ext in (".bin", ".idx", ".lang.bin", ".lang.idx"):
            assert filecmp.cmp(str(tmp_path / "fast0") + ext, str(tmp_path / f"fast{k}") + ext, shallow=False)


def test_parse_int_lists_accepts_json_integers_only():
    vals, counts = parse_int_lists([b"12, 907, 3", b"0", b"5,2047", b"1,10,100,1000"], 2048)
    assert vals.tolist() == [12, 907, 3, 0, 5, 2047, 1, 10, 100, 1000] and counts.tolist() == [3, 1, 2, 4]
    for bad in (b"1 2", b"1,,2", b"1, ,2", b"1,2,", b",1", b"", b"012", b"5,00", b"-1", b"1.5", b"1e3", b"+1",
                b"true", b'"7"', b"20480", b"1/2", b"1,\t2", b"99999999999999999999"):
        assert parse_int_lists([b"4", bad], 2048) is None, bad


@pytest.mark.parametrize("line", [
    '{"units": 5, "x": [1, 2]}',                 # '[' of another field
    '{"file_name": "[1]", "units": "[2]"}',      # brackets inside strings
    '{"file_name": "\\"units\\": [1]", "units": [3, true]}',
    '{"units": [1, 2], "units2": [3]}',
    '{"audio_repr": 5, "file_name": "<Un1>"}',
    '{"file_name": "x", "units": [1, 2], "lang": null}',
    '{"file_name": "x", "units": [1, 2], "duration": [1, true]}',
])
def test_fast_path_never_accepts_what_the_record_path_refuses(tmp_path, monkeypatch, line):
    src = write_jsonl(tmp_path / "u.jsonl", ['{"file_name": "ok", "units": [7, 8]}', line])
    outcomes = []
    for record_path in ("0", "1"):
        monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", record_path)
        try:
            m = build_dataset([src], str(tmp_path / f"o{record_path}"), vocab=UnitVocab(), progress=False)
            outcomes.append(("ok", m["content_hash"]))
        except Exception as e:                      # noqa: BLE001 - compare whatever happens
            outcomes.append((type(e).__name__, str(e)))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("limit", [10, 1000, 2048, 10000, 65536, 10 ** 8])
def test_parse_int_lists_reads_every_width(limit):
    """The word-at-a-time reader (4-byte words up to 4 digits, 8-byte words above) against Python's int,
    compact and spaced separators; a number one digit too long is refused or read out of range."""
    rng = np.random.default_rng(limit)
    for trial in range(100):
        bodies, want = [], []
        for _ in range(int(rng.integers(1, 6))):
            v = rng.integers(0, limit, size=int(rng.integers(1, 8)))
            want += v.tolist()
            bodies.append((", " if trial % 2 else ",").join(map(str, v)).encode())
        vals, counts = parse_int_lists(bodies, limit)
        assert vals.tolist() == want and counts.tolist() == [b.count(b",") + 1 for b in bodies]
    for big in (str(limit * 10).encode(), b"123456789", b"99999999999999999999"):
        r = parse_int_lists([b"1", big], limit)
        assert r is None or (r[0][1] == int(big) and r[0][1] >= limit)


def test_npy_bounds_in_other_layouts_build_the_same_bytes(tmp_path, monkeypatch):
    """Sidecar lines in other layouts (key order, spacing, non-ASCII ids, no lang) write the record path's
    bytes."""
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 30, size=300)
    off = np.concatenate(([0], np.cumsum(lens)))
    np.save(tmp_path / "n.npy", rng.integers(0, 2048, size=int(off[-1])).astype(np.int64))
    with open(tmp_path / "n.bounds.jsonl", "w") as f:
        for i in range(300):
            o = {"end": int(off[i + 1]), "start": int(off[i]), "id": f"ütt{i}"}
            if i % 3:
                o["lang"] = "fr"
            f.write(json.dumps(o, ensure_ascii=i % 2 == 0, indent=None, separators=(", ", " : ")) + "\n")
    outs = []
    for record_path in ("0", "1"):
        monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", record_path)
        build_dataset([str(tmp_path / "n.npy")], str(tmp_path / f"o{record_path}"), vocab=UnitVocab(),
                      progress=False, chunk_size=70)
        outs.append(str(tmp_path / f"o{record_path}"))
    _same(*outs)


def test_chunk_ranges_cover_every_line_once_with_its_number(tmp_path, monkeypatch):
    """iter_chunk_ranges (what pool workers get: cut by size, lines counted by NumPy) tiles every file:
    ranges in order, each ending at a newline (or the end of the file), each with the right line count and
    first line number, together the lines iter_chunks reads -- with no newline at the end, blank lines,
    lines longer than a chunk and a mean line length estimated from a few bytes."""
    import io
    import random

    import data_tools.formats as formats
    from data_tools.formats import InputSpec, iter_chunk_ranges, iter_chunks

    rnd = random.Random(0)
    p = tmp_path / "a.jsonl"
    for trial in range(300):
        monkeypatch.setattr(formats, "LINE_SAMPLE", rnd.choice([3, 16, 1 << 20]))
        n = rnd.randint(0, 40)
        text = b"\n".join(b"x" * rnd.choice([0, 1, 5, 9, 60]) for _ in range(n))
        text += b"\n" if n and rnd.random() < 0.5 else b""
        text += b"\n\n" if rnd.random() < 0.2 else b""
        p.write_bytes(text)
        cs = rnd.randint(1, 7)
        want = [l for _, _, pl in iter_chunks([InputSpec(str(p), "a")], cs) for l in pl]
        got, at, line = [], 0, 1
        for fi, first, (offset, nbytes, nlines) in iter_chunk_ranges([InputSpec(str(p), "a")], cs):
            assert (fi, offset, first) == (0, at, line) and nbytes > 0
            chunk = text[offset:offset + nbytes]
            assert chunk.endswith(b"\n") or offset + nbytes == len(text)
            lines = io.BytesIO(chunk).readlines()
            assert len(lines) == nlines
            got += lines
            at, line = offset + nbytes, line + nlines
        assert at == len(text) and got == want, (text, cs)


def _lines_array(lines):
    return np.frombuffer("".join(l + "\n" for l in lines).encode(), dtype=np.uint8)


def test_template_lines_reads_what_orjson_reads():
    """Sidecar-like lines in a few layouts (key order, spacing, digits inside strings, non-ASCII, extra
    fields, blank lines; escapes are refused, below): every record's integers and fixed fields are orjson's."""
    import orjson

    from data_tools.templates import template_lines

    rng = np.random.default_rng(3)
    for trial in range(60):
        lines, want = [], []
        for i in range(int(rng.integers(1, 80))):
            if rng.random() < 0.05:
                lines.append(" " if rng.random() < 0.5 else "")
                continue
            o = {"id": f"spk{rng.integers(0, 99)}/ütt{i:06d}", "start": int(rng.integers(0, 10 ** rng.integers(1, 12))),
                 "end": int(rng.integers(0, 10 ** 9)), "lang": ["en", "fr"][int(rng.integers(0, 2))]}
            if trial % 3 == 0:
                o["score"] = "0.5"
            if trial % 4 == 1:
                o = {k: o[k] for k in ("end", "lang", "id", "start")}
            lines.append(json.dumps(o, ensure_ascii=False,
                                    separators=[(", ", ": "), (",", ":")][int(rng.integers(0, 2)) if trial % 5 else 0]))
            want.append(o)
        got = template_lines(_lines_array(lines), ("start", "end"), ("lang",))
        assert got is not None, lines
        templates, records, tmpl_of, ints = got
        assert records.tolist() == [k for k, l in enumerate(lines) if l.strip()]
        assert ints["start"].tolist() == [o["start"] for o in want]
        assert ints["end"].tolist() == [o["end"] for o in want]
        assert [templates[t].obj["lang"] for t in tmpl_of] == [o["lang"] for o in want]
        assert [orjson.loads(lines[k]) for k in records] == want


@pytest.mark.parametrize("bad", [
    '{"start": 012, "end": 20}', '{"start": 1.5, "end": 20}', '{"start": -1, "end": 20}',
    '{"start": 1e3, "end": 20}', '{"start": 1, "end": 20, "x1": 2}', '{"start": 1, "start": 2, "end": 20}',
    '{"id": "\\u00e9", "start": 1, "end": 20}', '{"start": 1234567890123456, "end": 20}', '{"start": 1}',
    '{"start": true, "end": 20}', '{"start": 1, "end": 20, "a": [1, 2]}', '{"start": 1, "end": 20',
    '[1, 2]', '{"start": 1, "end": 20, "lang": "e1"}', '{"start": "1", "end": 20}'])
def test_template_lines_refuses_what_it_cannot_vouch_for(bad):
    from data_tools.templates import template_lines

    assert template_lines(_lines_array(['{"start": 0, "end": 1}', bad]), ("start", "end"), ("lang",)) is None


@pytest.mark.parametrize("line", [
    '{"start": 012, "end": 20}', '{"start": 1.0, "end": 20}', '{"start": 1, "end": 20, "x1": 2}',
    '{"start": 20, "start": 1, "end": 20}', '{"id": "\\u00e9", "start": 1, "end": 20}', '{"start": 1}',
    '{"start": 99999999999999999999, "end": 20}', '{"start": 1, "end": 20, "lang": "de"}', '{"start": 1, "end": 20',
    '{"start": 1, "end": 2000}', '{"start": 5, "end": 5}', '{"start": 1, "end": 20, "lang": "fr"}',
    '{"id": "a\xff", "start": 1, "end": 20}', '{"id": "\xff7", "start": 1, "end": 20}',
    '{"id": "7\xff", "start": 1, "end": 20}', '{"id": "a\xe9", "start": 1, "end": 20}'])
def test_npy_sidecar_fast_path_never_accepts_what_the_record_path_refuses(tmp_path, monkeypatch, line):
    np.save(tmp_path / "n.npy", np.arange(40, dtype=np.int64))
    # as bytes: "\xff" and "\xe9" stand for those raw bytes (invalid UTF-8; 0xFF is the layouts' slot byte)
    (tmp_path / "n.bounds.jsonl").write_bytes(b'{"id": "a", "start": 0, "end": 3}\n' + line.encode("latin-1") + b"\n")
    outcomes = []
    for record_path in ("0", "1"):
        monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", record_path)
        try:
            m = build_dataset([str(tmp_path / "n.npy")], str(tmp_path / f"o{record_path}"), vocab=UnitVocab(),
                              progress=False)
            outcomes.append(("ok", m["content_hash"], m["ignored_fields"] and sorted(m["ignored_fields"].values())))
        except Exception as e:                      # noqa: BLE001 - compare whatever happens
            outcomes.append((type(e).__name__, str(e)))
    assert outcomes[0] == outcomes[1]


def test_jsonl_lines_read_by_layout_build_the_record_paths_bytes(tmp_path, monkeypatch):
    """Utterance lines without ``duration`` are read by their layouts (fast._utterance_layouts): mixed
    languages, a default language, digits in file names, an unknown field, both json.dumps layouts and a
    blank line write the record path's bytes and report the same unknown field."""
    import data_tools.fast as fast

    rng = np.random.default_rng(5)
    lines = []
    for i in range(700):
        r = {"file_name": f"spk{i % 13}/utt{i:05d}.flac", "units": rng.integers(0, 2048, int(rng.integers(1, 60))).tolist()}
        if i % 3:
            r["lang"] = ["en", "fr"][i % 2]
        if i % 50 == 7:
            r["speaker"] = "x"
        lines.append(json.dumps(r, separators=(", ", ": ") if i % 4 else (",", ":")))
    lines.insert(99, "")
    src = write_jsonl(tmp_path / "u.jsonl", lines)
    used = []
    real = fast._utterance_layouts
    monkeypatch.setattr(fast, "_utterance_layouts", lambda *a: used.append(real(*a)) or used[-1])
    outs = []
    for record_path in ("0", "1"):
        monkeypatch.setenv("DATA_TOOLS_RECORD_PATH", record_path)
        m = build_dataset([src], str(tmp_path / f"o{record_path}"), vocab=UnitVocab(codebook_size=2048),
                          progress=False, chunk_size=128)
        outs.append((str(tmp_path / f"o{record_path}"), m["ignored_fields"]))
    _same(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1] and list(outs[0][1].values()) == [["speaker"]]
    assert used and all(u is not None for u in used)


@pytest.mark.parametrize("case", ["int16", "big-endian", "uint32", "2-D", "float", "empty", "truncated", "v2 header",
                                  "not npy"])
def test_npy_mapped_up_front_reads_what_np_load_reads(tmp_path, monkeypatch, case):
    """arrays._npy_populated (a MAP_POPULATE map of a plain .npy) gives the bytes and the errors that
    np.load's memory map gives, for other dtypes, byte orders, shapes and header versions."""
    import data_tools.arrays as arrays

    units = np.arange(30) % 7
    arr = {"int16": units.astype(np.int16), "big-endian": units.astype(">i4"), "uint32": units.astype(np.uint32),
           "2-D": units.reshape(5, 6), "float": units.astype(float), "empty": units[:0]}.get(case, units)
    path = tmp_path / "n.npy"
    if case == "v2 header":
        with open(path, "wb") as f:
            np.lib.format.write_array(f, arr, version=(2, 0))
    else:
        np.save(path, arr)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-16])
    if case == "not npy":
        path.write_bytes(b"PK\x03\x04 not an array at all")
    (tmp_path / "n.bounds.jsonl").write_text('{"start": 0, "end": 12}\n{"start": 12, "end": 30}\n')
    outcomes = []
    for mapped in (True, False):
        if not mapped:
            monkeypatch.setattr(arrays, "_npy_populated", lambda p: None)
        try:
            m = build_dataset([str(path)], str(tmp_path / f"o{mapped}"), vocab=UnitVocab(), progress=False)
            outcomes.append(("ok", m["content_hash"]))
        except Exception as e:                      # noqa: BLE001 - compare whatever happens
            outcomes.append((type(e).__name__, str(e).replace(str(tmp_path), "")))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][0] == "ok") == (case in ("int16", "big-endian", "uint32", "v2 header")), outcomes
