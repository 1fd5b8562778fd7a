"""Progress where a long command runs (megaslm/progress.py, issue 24 item 2): plain periodic lines with a total
and an ETA when stderr is not a terminal (a SLURM log), a tqdm bar with its total on one (a missing
file said before megatron-core's import: test_imports.py)."""
import io
import json
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from megaslm import progress
from megaslm.progress import Progress

LINE = re.compile(r"^build o: [\d.,]+/([\d.,]+) MB \([\d.]+%\), [\d.,]+ MB/s, elapsed \d+:\d\d:\d\d, "
                  r"(ETA \d+:\d\d:\d\d|ETA \?|done)$")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_every_n_seconds_with_total_and_eta():
    clock, out = Clock(), io.StringIO()
    with Progress("build x", total=1000, unit="records", file=out, every=10, clock=clock) as p:
        for _ in range(30):          # 30 updates of 10 records, one every 2 s: a line every 5th update
            clock.t += 2
            p.update(10)
    lines = out.getvalue().splitlines()
    assert lines[0] == "build x: 50/1,000 records (5.0%), 5 records/s, elapsed 0:00:10, ETA 0:03:10"
    assert len(lines) == 7 and lines[-2].startswith("build x: 300/1,000 records (30.0%)")
    assert lines[-1] == "build x: 300/1,000 records (30.0%), 5 records/s, elapsed 0:01:00, done"


def test_bytes_in_mb_and_short_work_is_silent_and_zero_disables():
    clock, out = Clock(), io.StringIO()
    with Progress("build y", total=52_400_000, unit="B", file=out, every=1, clock=clock) as p:
        clock.t += 2
        p.update(12_600_000)
    assert out.getvalue().splitlines()[0] == \
        "build y: 12.6/52.4 MB (24.0%), 6.3 MB/s, elapsed 0:00:02, ETA 0:00:06"
    quick = io.StringIO()
    with Progress("z", total=5, file=quick, every=30, clock=Clock()) as p:
        p.update(5)                  # under N seconds: no line at all, not even the last
    off = io.StringIO()
    with Progress("z", total=5, file=off, every=0, clock=clock) as p:
        clock.t += 100
        p.update(5)
    assert quick.getvalue() == off.getvalue() == ""


def test_every_from_option_and_environment(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.every_seconds() == progress.DEFAULT_EVERY
    monkeypatch.setenv(progress.ENV, "2.5")
    assert progress.every_seconds() == 2.5 and Progress("a", file=io.StringIO()).every == 2.5
    monkeypatch.setenv(progress.ENV, "soon")
    assert progress.every_seconds() == progress.DEFAULT_EVERY
    progress.apply_progress_option(0.5)      # the option wins, and what the command starts inherits it
    assert os.environ[progress.ENV] == "0.5"
    from data_tools.cli import make_parser
    assert make_parser().parse_args(["build", "-i", "a", "-o", "b", "--progress-every", "7"]).progress_every == 7
    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "-i", "a", "-o", "b", "--progress-every", "-1"])


def test_a_terminal_gets_a_tqdm_bar_with_its_total():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with Progress("build t", total=4_000_000, unit="B", file=out, every=30) as p:
        assert p.bar is not None and p.bar.total == 4_000_000
        p.update(1_000_000)
    assert "build t" in out.getvalue() and "4.00M" in out.getvalue() and "25%" in out.getvalue()
    assert Progress("n", total=3, file=Tty(), every=0).bar is None       # 0: no bar either


def _big_jsonl(path, records, units=120):
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(records):
            f.write(json.dumps({"units": [r.randrange(2048) for _ in range(units)], "lang": "en"}) + "\n")
    return os.path.getsize(path)


def test_build_into_a_log_file_leaves_periodic_lines_with_a_total(tmp_path):
    """``python -m data_tools build ... 2> log``: progress lines with the input's size as their total."""
    src = tmp_path / "big.jsonl"
    size = _big_jsonl(src, 15_000)
    with open(tmp_path / "log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "data_tools", "build", "-i", str(src), "-o", str(tmp_path / "o"),
                            "--chunk-size", "100", "--progress-every", "0.02"], cwd=ROOT, stderr=log,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    text = (tmp_path / "log").read_text()
    assert r.returncode == 0, text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(LINE.match(l) for l in lines), text
    assert {LINE.match(l).group(1) for l in lines} == {f"{size / 1e6:,.1f}"}
    assert lines[-1].endswith("done") and "(100.0%)" in lines[-1]


def test_build_bytes_cover_every_input_kind_once(tmp_path):
    """The bytes a build reports add up to the inputs' size, whatever their kind and however they are cut."""
    import numpy as np

    from data_tools.build import _InputBytes
    from data_tools.formats import InputSpec, iter_chunk_ranges
    a = tmp_path / "a.jsonl"
    _big_jsonl(a, 300, 10)
    z = tmp_path / "b.npz"
    np.savez(z, units=np.arange(500, dtype=np.int32) % 100, offsets=np.arange(0, 501, 5))
    y = tmp_path / "c.npy"
    np.save(y, np.arange(400, dtype=np.int32) % 100)
    (tmp_path / "c.bounds.jsonl").write_text("".join(json.dumps({"start": i, "end": i + 4}) + "\n"
                                                     for i in range(0, 400, 4)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = tmp_path / "d.parquet"
    pq.write_table(pa.table({"units": [[i, i + 1] for i in range(90)]}), t, row_group_size=20)
    specs = [InputSpec.parse(str(p)) for p in (a, z, y, t)]
    where = _InputBytes(specs)
    assert where.total == sum(os.path.getsize(p) for p in (a, z, y, t, tmp_path / "c.bounds.jsonl"))
    jobs = list(where.jobs(enumerate(iter_chunk_ranges(specs, 37, 1))))
    steps = [where.advance() for _ in jobs]
    assert len(jobs) > 4 and min(steps) > 0 and sum(steps) == where.total


def test_tokenize_reports_audio_hours(monkeypatch, capsys):
    """``tokenize``'s progress: this rank's audio hours, with their total."""
    from data_tools.audio.run import TokenizeOptions, _progress_bar
    monkeypatch.setenv(progress.ENV, "1e-9")
    bar = _progress_bar(TokenizeOptions(output="o.jsonl"), 1, [(0, [0, 1], []), (3, [2], [])],
                        {0: 3600.0, 1: 1800.0, 2: 1800.0})
    bar.update(0.5)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("tokenize rank 1 audio hours: 0.500/2.000 h (25.0%), ") and "ETA" in lines[0]
    assert lines[-1].endswith("done")
    assert _progress_bar(TokenizeOptions(output="o.jsonl", progress=False), 0, [(0, [0], [])], {0: 1.0}) is None
