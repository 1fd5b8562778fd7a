"""The one benchmark record (kernels/bench/record.py): its fields, the goal / met rule, the atomic write into the
one results folder, the stored records, and that every benchmark script of the repository writes through it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.bench import record

ROOT = Path(__file__).resolve().parents[2]

# every benchmark script of the repository (a new one: add it here, and write through kernels/bench/record.py)
BENCHMARKS = {
    "kernels/bench/bench_all.py": "bench_all",
    "kernels/bench/bench_attention.py": "bench_attention",
    "kernels/bench/bench_doc_mask.py": "bench_doc_mask",
    "kernels/bench/bench_embedding.py": "bench_embedding",
    "kernels/bench/compile_all.py": "compile_all",
    "data_tools/bench_build.py": "bench_build",
    "data_tools/bench_arrow.py": "bench_arrow",
    "data_tools/audio/throughput.py": "tokenize_throughput",
    "launchers/bench_train.py": "bench_train",
    "launchers/bench_trainer_cpu.py": "bench_trainer_cpu",
}
# what writes through the record module: the module itself and the kernel benchmarks' timing harness
HARNESS_IMPORT = re.compile(r"^\s*(from kernels\.bench(\.record)? import .*\b(record|harness)\b"
                            r"|from kernels\.bench\.record import |import kernels\.bench\.record)", re.M)


def _rec(**kw):
    args = dict(command="python -m x", commit="abc", date="2026-12-03T10:00:00Z")
    args.update(kw)
    return record.make_record("bench_x", "NVIDIA H100 80GB HBM3", {"a": 1.5}, **args)


def test_a_record_has_every_field():
    run = record.Run("bench_x", ["--steps", "3", "a b"], prog="python -m demo")
    rec = run.record("cpu: test, 2 cores", {"tokens_per_s": 12.5, "lost": float("nan")},
                     [record.goal("speed", 12.5, ">=", 10, "tok/s")], environment={"torch": "2.x"})
    assert tuple(rec)[:len(record.FIELDS)] == record.FIELDS
    assert rec["format"] == record.FORMAT and rec["benchmark"] == "bench_x"
    assert rec["command"] == "python -m demo --steps 3 'a b'"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["date"])
    assert rec["commit"] and set(rec["load"]) == {"before", "after"}
    assert rec["load"]["before"] is None or len(rec["load"]["before"]) == 3
    assert rec["figures"] == {"tokens_per_s": 12.5, "lost": None}      # what could not be measured is null
    assert rec["environment"]["torch"] == "2.x" and rec["environment"]["python"]
    assert rec["met"] is True and rec["dry_run"] is False
    json.dumps(rec, allow_nan=False)


def test_goal_and_met():
    assert record.goal("g", 1.0, ">=", 1.0)["met"] is True
    assert record.goal("g", 0.99, ">=", 1.0)["met"] is False
    assert record.goal("g", 1.6, "<=", 1.5)["met"] is False
    assert record.goal("g", 201, "==", 201)["met"] is True
    assert record.goal("g", None, ">=", 1.0)["met"] is None               # not measured: unknown, not failed
    assert record.goal("g", float("nan"), ">=", 1.0) == {**record.goal("g", None, ">=", 1.0)}
    with pytest.raises(ValueError, match="op must be one of"):
        record.goal("g", 1, "~", 1)
    yes, no, unknown = (record.goal("g", v, ">=", 1) for v in (2, 0, None))
    assert record.overall([yes, yes]) is True
    assert record.overall([yes, no, unknown]) is False                   # one goal missed is known
    assert record.overall([yes, unknown]) is None
    assert record.overall([]) is None                                    # no goal: nothing to meet
    assert _rec(goals=[yes, no])["met"] is False
    dry = _rec(goals=[yes, no], dry_run=True)                            # a dry run judges nothing
    assert dry["met"] is None and all(g["met"] is None for g in dry["goals"])
    assert [g["measured"] for g in dry["goals"]] == [2, 0]


def test_validate_refuses_what_is_not_a_record():
    rec = _rec()
    for broken, message in (({k: v for k, v in rec.items() if k != "commit"}, "missing commit"),
                            ({**rec, "format": "other/1"}, "format"),
                            ({**rec, "device": ""}, "device"),
                            ({**rec, "load": [1, 2, 3]}, "load"),
                            ({**rec, "goals": [{"name": "g"}]}, "a goal needs"),
                            ({**rec, "goals": [record.goal("g", 0, ">=", 1)], "met": True}, "disagrees")):
        with pytest.raises(ValueError, match=message):
            record.validate(broken)


def test_write_is_atomic_into_the_results_folder(tmp_path, monkeypatch):
    assert record.RESULTS_DIR == ROOT / "docs" / "bench"
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    rec = _rec()
    path = record.write_record(rec, companions={".csv": "a,b\n1,2\n"})    # default: the results folder
    assert path == tmp_path / "results" / "bench_x-nvidia-h100-80gb-hbm3-2026-12-03T100000Z.json"
    assert json.loads(path.read_text()) == rec and path.with_suffix(".csv").read_text() == "a,b\n1,2\n"
    assert record.write_record(rec, tmp_path / "x" / "mine.json") == tmp_path / "x" / "mine.json"
    # a write that fails leaves the previous record whole and no temporary file behind
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(record.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        record.write_record({**rec, "figures": {"a": 2}})
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".csv").name])
    # an invalid record is refused before anything is written
    monkeypatch.undo()
    with pytest.raises(ValueError):
        record.write_record({**rec, "met": False}, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_read_records_skips_what_is_not_a_record_and_orders_by_date(tmp_path):
    record.write_record(_rec(date="2026-12-04T00:00:00Z"), tmp_path / "a-new.json")
    record.write_record(_rec(date="2026-12-01T00:00:00Z"), tmp_path / "z-old.json")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"device": {"name": "x"}, "rows": []}))
    assert [p.name for p, _ in record.read_records(tmp_path)] == ["z-old.json", "a-new.json"]
    assert list(record.read_records(tmp_path, ["bench_other"])) == []
    assert list(record.read_records(tmp_path / "missing")) == []


def test_every_stored_result_is_a_record_in_the_one_folder():
    """docs/bench holds records (and their .csv/.md companions, same stem), nothing else; the former result
    folders are gone."""
    files = sorted(p for p in record.RESULTS_DIR.iterdir() if p.name != "README.md")
    records = {p.stem for p in files if p.suffix == ".json"}
    assert records
    for p in files:
        assert p.suffix in (".json", ".csv", ".md") and p.stem in records, p.name
    for path, rec in record.read_records():
        assert path.stem in records and rec["benchmark"] in BENCHMARKS.values(), path.name
    assert len(list(record.read_records())) == len(records)     # every .json is a valid record
    for old in ("kernels/bench/results", "data_tools/bench_results"):
        assert not (ROOT / old).exists() or not any(p.is_file() for p in (ROOT / old).rglob("*")), old


def test_every_benchmark_script_writes_through_the_record():
    found = {str(p.relative_to(ROOT)) for pkg in ("kernels", "data_tools", "launchers", "megaslm", "evals")
             for p in (ROOT / pkg).rglob("*.py")
             if p.name.startswith("bench_") or (p.parent.name == "bench" and not p.name.startswith("_")
                                                 and p.name not in ("harness.py", "record.py"))}
    assert found <= set(BENCHMARKS), f"benchmark scripts not listed here: {sorted(found - set(BENCHMARKS))}"
    for script, name in BENCHMARKS.items():
        src = (ROOT / script).read_text()
        assert HARNESS_IMPORT.search(src), f"{script} does not import kernels/bench/record.py (or the harness)"
        named = f'"{name}"' in src or f'write_results(rows, dev, args, "{name[len("bench_"):]}")' in src
        assert named, f"{script} does not name its record {name}"
        # no benchmark writes its results by hand any more
        assert "json.dump(" not in src and "os.replace(" not in src, script
    harness = (ROOT / "kernels/bench/harness.py").read_text()
    assert "from kernels.bench import record" in harness and "run.write(" in harness


def test_the_record_imports_no_torch():
    """data_tools (torch-free) imports it: neither it nor the kernels package may pull torch in."""
    code = "import sys, kernels.bench.record, kernels.choice; assert 'torch' not in sys.modules, 'torch'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_data_tools_take_nothing_else_from_kernels():
    from tests.test_import_rules import imports_of

    bad = [(f, full) for f, m, full in imports_of("data_tools") if m == "kernels" and full != "kernels.bench.record"]
    assert not bad, bad


def _expand(path):
    """``a{1,2}b`` -> [a1b, a2b] (the docs cite sibling files that way)."""
    m = re.search(r"\{([^{}]*)\}", path)
    return [q for part in m.group(1).split(",") for q in _expand(path[:m.start()] + part + path[m.end():])] if m \
        else [path]


def test_the_docs_cite_stored_records_that_exist():
    """The README's performance table (and every other doc) cites records in docs/bench that are there."""
    cited = set()
    for doc in [ROOT / "README.md", ROOT / "kernels" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"(docs/bench/[^`'\s()\[\]|]+)", doc.read_text()):
            if "<" not in path and "*" not in path and path.rstrip("/") != "docs/bench":
                cited |= {(str(doc.relative_to(ROOT)), p) for p in _expand(path.rstrip(".,:;"))}
    missing = [(doc, p) for doc, p in sorted(cited) if not (ROOT / p).is_file()]
    assert not missing, missing
    readme = (ROOT / "README.md").read_text()
    performance = readme[readme.index("## Performance"):readme.index("\n## ", readme.index("## Performance") + 1)]
    # the table's rows with figures: compile check (3.9, 3.6), data build, CPU attention, trainer vs plain loop
    assert len(set(re.findall(r"docs/bench/[^`\s]+\.(?:json|\{json,md\})", performance))) >= 5, performance
