"""Issue 12 item 8 and issue 13 item 7 / 11 item 5 for data_tools: invalid UTF-8 and an output prefix that
cannot be created give one-line errors; JSON booleans are not units; unknown fields are warned about once
per file (and recorded in the manifest); slamkit's tokenised ``audio_repr`` lines are read."""
import json
import os

import numpy as np
import pytest

from megaslm.vocab import UnitVocab

from data_tools.build import build_dataset
from data_tools.cli import main
from data_tools.errors import DataError

from conftest import leftovers, read_docs, write_jsonl


def _cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_invalid_utf8_is_one_line_naming_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"file_name": "a.flac", "units": [1, 2]}\n')
        f.write(b'{"file_name": "caf\xe9.flac", "units": [3, 4]}\n')      # latin-1, not UTF-8
    out = tmp_path / "out"
    err = _cli_error(capsys, ["build", "-i", str(src), "-o", str(out / "ds"), "-q"])
    assert f"{src}:2: invalid UTF-8 (byte 0xe9" in err
    assert not os.path.exists(out) or leftovers(out, "ds") == []
    # --skip-bad quarantines the line and builds the rest
    assert main(["build", "-i", str(src), "-o", str(out / "ds"), "-q", "--skip-bad"]) == 0
    q = [json.loads(l) for l in open(str(out / "ds") + ".quarantine.jsonl")]
    assert len(q) == 1 and q[0]["line"] == 2 and "UTF-8" in q[0]["error"]
    assert len(read_docs(str(out / "ds"))) == 1


def test_output_prefix_that_cannot_be_created(tmp_path, capsys):
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": "a", "units": [1, 2]}])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    prefix = str(blocker / "sub" / "ds")
    err = _cli_error(capsys, ["build", "-i", src, "-o", prefix, "-q"])
    assert err.startswith(f"error: {prefix}: cannot create the output here")
    with pytest.raises(DataError):
        build_dataset([src], prefix, progress=False)
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("units,field", [([1, True, 3], "units[1]"), ([False], "units[0]"), ([True, True], "units[0]")])
def test_json_booleans_are_not_units(tmp_path, units, field):
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": "ok", "units": [1, 2]},
                                             {"file_name": "b", "units": units}])
    with pytest.raises(DataError) as ei:
        build_dataset([src], str(tmp_path / "ds"), progress=False)
    e = ei.value
    assert e.line == 2 and e.field == field and "not an integer" in str(e)
    story = write_jsonl(tmp_path / "s.jsonl", [{"id": "s", "en": [[1, True]], "fr": [[2]]}])
    with pytest.raises(DataError) as ei:
        build_dataset([story], str(tmp_path / "ds2"), progress=False)
    assert ei.value.field == "en[0][1]"


def test_unknown_fields_warned_once_per_file_and_recorded(tmp_path, capsys):
    utt = write_jsonl(tmp_path / "u.jsonl", [{"file_name": f"{i}", "units": [1, 2], "speaker": "s1",
                                              **({"txt": "hi"} if i == 1500 else {})} for i in range(2000)])
    story = write_jsonl(tmp_path / "s.jsonl", [{"id": "s", "en": [[1]], "fr": [[2]], "title": "x"}])
    clean = write_jsonl(tmp_path / "c.jsonl", [{"file_name": "c", "units": [3]}])
    prefix = str(tmp_path / "ds")
    assert main(["build", "-i", utt, "-i", story, "-i", clean, "-o", prefix, "-q", "--workers", "2",
                 "--chunk-size", "300"]) == 0
    err = capsys.readouterr().err.splitlines()
    warns = [l for l in err if l.startswith("warning:")]
    assert warns == [f"warning: {utt}: unknown field(s) ['speaker', 'txt'] ignored (data_tools reads only the "
                     f"fields in docs/data_tools.md)",
                     f"warning: {story}: unknown field(s) ['title'] ignored (data_tools reads only the fields in "
                     f"docs/data_tools.md)"]
    man = json.load(open(prefix + ".manifest.json"))
    assert man["ignored_fields"] == {utt: ["speaker", "txt"], story: ["title"]}


def test_slamkit_audio_repr_lines(tmp_path):
    # written by hand in the form slamkit's prepare_tokens writes with its unit tokeniser
    src = tmp_path / "slamkit_tokens.jsonl"
    src.write_text('{"file_name": "LibriSpeech/19-198-0001.flac", "audio_repr": "<Un12><Un907><Un3><Un3>"}\n'
                   '{"file_name": "LibriSpeech/19-198-0002.flac", "audio_repr": "<Un5><Un88>", "lang": "fr"}\n')
    prefix = str(tmp_path / "ds")
    m = build_dataset([str(src)], prefix, vocab=UnitVocab(codebook_size=1000), progress=False)
    off = UnitVocab(codebook_size=1000).offset
    docs = read_docs(prefix)
    assert [d[0].tolist() for d in docs] == [[12 + off, 907 + off, 3 + off, 3 + off, 2], [5 + off, 88 + off, 2]]
    assert [d[1].tolist() for d in docs] == [[1, 1, 1, 1, 0], [2, 2, 0]]
    assert m["units_in"] == 6 and m["ignored_fields"] == {}
    for bad, field, msg in [('"<Un12>[TEXT]hello"', "audio_repr", "expected only <UnN> unit tokens"),
                            ('""', "audio_repr", "empty"), ("[1, 2]", "audio_repr", "expected a string"),
                            ('"<Un5000>"', "audio_repr[0]", "out of range")]:
        src.write_text('{"file_name": "a", "audio_repr": "<Un1>"}\n{"file_name": "b", "audio_repr": ' + bad + '}\n')
        with pytest.raises(DataError) as ei:
            build_dataset([str(src)], prefix + "2", vocab=UnitVocab(codebook_size=1000), progress=False)
        assert ei.value.line == 2 and ei.value.field == field and msg in str(ei.value), str(ei.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_write_is_one_line_and_leaves_the_old_dataset(tmp_path, workers):
    """A write that fails mid-build (here a 1 MB file-size limit, as a full disk would) is one line naming
    the file, from the writer thread (1 worker) or a pool worker, and the dataset already at the prefix is
    left whole."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    src = write_jsonl(tmp_path / "u.jsonl", [{"file_name": f"u{i}", "units": rng.integers(0, 500, 300).tolist()}
                                             for i in range(4000)])
    small = write_jsonl(tmp_path / "s.jsonl", [{"file_name": "a", "units": [1, 2]}])
    prefix = str(tmp_path / "ds")
    build_dataset([small], prefix, progress=False)
    before = {n: open(os.path.join(tmp_path, n), "rb").read() for n in leftovers(tmp_path, "ds")}
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from data_tools.cli import main; "
            f"sys.exit(main(['build', '-i', {src!r}, '-o', {prefix!r}, '-q', '--workers', '{workers}']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write the dataset (File too large)" in r.stderr and "final.bin" in r.stderr
    assert {n: open(os.path.join(tmp_path, n), "rb").read() for n in leftovers(tmp_path, "ds")} == before
