"""The data-build benchmark runs end to end on a small input: anchor and build byte-identical, every worker
count identical, and a stored record with the machine, commit and figures (no timing is asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_build_small_run_stores_its_record(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "data_tools.bench_build", "--sequences", "300", "--repeats", "1",
                        "--scale", "2", "--workers", "1,2", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(out.read_text())   # the project's one record format (kernels/bench/record.py)
    assert rec["benchmark"] == "bench_build" and rec["device"].startswith("cpu: ")
    assert rec["commit"] and rec["date"] and rec["load"]["before"] and rec["load"]["after"]
    assert [g["name"].split()[0] for g in rec["goals"]] == ["jsonl", "jsonl", "npy", "npz"]
    assert all(g["measured"] > 0 for g in rec["goals"]) and rec["met"] in (True, False)
    results = rec["figures"]["results"]
    assert [row["format"] for row in results] == ["jsonl", "npy", "npz"]
    for row in results:
        for w in ("1", "2"):
            got = row["workers"][w]
            assert got["byte_identical_to_anchor"] is True
            assert got["units_per_s"] > 0 and got["cpu_s"] > 0
        scaling = row["scaling"]["workers"]
        assert scaling["2"]["identical_to_1_worker"] is True and scaling["2"]["cores_busy"] > 0
    assert "byte-identical: True" in r.stdout and "speed-up vs 1 worker" in r.stdout
