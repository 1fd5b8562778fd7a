"""Each bad-input case: an error naming file:line:field (CLI: one stderr line, exit 2), no partial dataset;
with --skip-bad: a quarantine report counted in the manifest."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaslm.vocab import UnitVocab, read_manifest

from data_tools.build import build_dataset
from data_tools.cli import main
from data_tools.errors import DataError

from conftest import ROOT, leftovers, read_docs, write_jsonl

GOOD_STORY = {"id": "ok", "en": [[1, 2], [3]], "fr": [[4], [5, 6]]}
GOOD_UTT = {"file_name": "ok.flac", "units": [1, 2, 3]}

CASES = {
    # name: (records, expected field, expected message part)
    "invalid_json": ([GOOD_UTT, '{"file_name": "x", "units": [1, 2'], None, "invalid JSON"),
    "out_of_range": ([GOOD_UTT, {"file_name": "x", "units": [1, 2048]}], "units[1]", "out of range"),
    "negative": ([GOOD_UTT, {"file_name": "x", "units": [4, -3]}], "units[1]", "negative"),
    "float_unit": ([GOOD_UTT, {"file_name": "x", "units": [1, 2.5]}], "units[1]", "not an integer"),
    "string_unit": ([GOOD_UTT, {"file_name": "x", "units": ["7"]}], "units[0]", "not an integer"),
    "empty_utterance": ([GOOD_UTT, {"file_name": "x", "units": []}], "units", "empty"),
    "count_mismatch": ([GOOD_STORY, {"id": 1, "en": [[1], [2]], "fr": [[3]]}], "fr", "sentences but 'en' has 2"),
    "empty_story": ([GOOD_STORY, {"id": 2, "en": [], "fr": []}], "en", "empty story"),
    "empty_sentence": ([GOOD_STORY, {"id": 3, "en": [[1], []], "fr": [[3], [4]]}], "en[1]", "empty"),
    "story_unit_range": ([GOOD_STORY, {"id": 4, "en": [[1]], "fr": [[9999]]}], "fr[0][0]", "out of range"),
    "missing_lang": ([GOOD_STORY, {"id": 5, "en": [[1]]}], "fr", "missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_fails_naming_file_line_field(tmp_path, case, capsys):
    records, field, msg = CASES[case]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    os.makedirs(out)
    with pytest.raises(DataError) as ei:
        build_dataset([src], str(out / "ds"), vocab=UnitVocab(), progress=False)
    e = ei.value
    assert e.path == src and e.line == 2 and e.field == field and msg in str(e)
    assert str(e).startswith(f"{src}:2: ")
    assert leftovers(out, "ds") == []                      # no partial dataset, no temp dir
    # the CLI: one line on stderr, exit 2
    rc = main(["build", "-i", src, "-o", str(out / "ds"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{src}:2:" in err and "Traceback" not in err
    if field:
        assert f"field '{field}'" in err
    assert leftovers(out, "ds") == []


def test_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    rc = main(["build", "-i", missing, "-o", str(tmp_path / "ds"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and missing in err and "not found" in err
    np.save(tmp_path / "a.npy", np.arange(4))
    rc = main(["build", "-i", str(tmp_path / "a.npy"), "-o", str(tmp_path / "ds"), "-q"])
    assert rc == 2 and "a.bounds.jsonl" in capsys.readouterr().err
    assert leftovers(tmp_path, "ds") == []


def test_npy_bad_unit_names_sidecar_line(tmp_path):
    np.save(tmp_path / "a.npy", np.array([1, 2, 3, 70000]))
    write_jsonl(tmp_path / "a.bounds.jsonl", [{"id": 0, "start": 0, "end": 2}, {"id": 1, "start": 2, "end": 4}])
    with pytest.raises(DataError, match=r"a\.bounds\.jsonl:2: field 'units\[1\]': unit 70000 out of range"):
        build_dataset([str(tmp_path / "a.npy")], str(tmp_path / "ds"), progress=False)


def test_skip_bad_quarantines_and_counts(tmp_path):
    records = [GOOD_UTT, '{"bad json', {"file_name": "neg", "units": [-1]}, GOOD_UTT,
               {"file_name": "big", "units": [5000]}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    m = build_dataset([src], str(tmp_path / "ds"), skip_bad=True, progress=False, chunk_size=2, workers=2)
    assert m["documents"] == 2 and len(read_docs(str(tmp_path / "ds"))) == 2
    q = m["quarantine"]
    assert q["count"] == 3 and q["report"] == str(tmp_path / "ds") + ".quarantine.jsonl"
    rep = [json.loads(l) for l in open(q["report"])]
    assert [(r["line"], r["field"]) for r in rep] == [(2, None), (3, "units[0]"), (5, "units[0]")]
    assert all(r["input"] == src for r in rep)
    assert read_manifest(str(tmp_path / "ds"))["quarantine"]["count"] == 3


def test_all_bad_with_skip_bad_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ['{"x'])
    with pytest.raises(DataError, match="no valid records"):
        build_dataset([src], str(tmp_path / "ds"), skip_bad=True, progress=False)
    assert leftovers(tmp_path, "ds") == []


def test_failed_rebuild_keeps_previous_dataset_and_error_late_in_parallel_build(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_UTT] * 50)
    m = build_dataset([good], str(tmp_path / "ds"), progress=False)
    before = {n: open(tmp_path / n, "rb").read() for n in leftovers(tmp_path, "ds")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_UTT] * 40 + [{"file_name": "z", "units": [1.5]}] + [GOOD_UTT] * 9)
    with pytest.raises(DataError, match=r"bad\.jsonl:41: field 'units\[0\]'"):
        build_dataset([bad], str(tmp_path / "ds"), progress=False, workers=2, chunk_size=5)
    assert {n: open(tmp_path / n, "rb").read() for n in leftovers(tmp_path, "ds")} == before


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import data_tools.build as b
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_UTT] * 20)

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(b, "make_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        b.build_dataset([good], str(tmp_path / "ds"), progress=False, chunk_size=3)
    assert leftovers(tmp_path, "ds") == []


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD_UTT, {"file_name": "x", "units": [1, -2]}])
    r = subprocess.run([sys.executable, "-m", "data_tools", "build", "-i", src, "-o", str(tmp_path / "ds")],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {src}:2: field 'units[1]': negative unit -2"
