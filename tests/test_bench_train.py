"""The GPU training benchmark's plumbing runs on CPU (tiny model, reference path): it trains through the real
Trainer, and writes results with device, commit, date and the step-time breakdown."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_dry_run(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "bench_train.py"), "--dry-run",
                        "--recompute", "none", "full", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [path] = out.glob("bench_train-*.json")      # a dry run's record goes beside its runs, not to docs/bench
    rec = json.loads(path.read_text())
    assert rec["device"] and rec["commit"] and rec["date"] and rec["dry_run"] is True and rec["met"] is None
    row, full = rec["figures"]["results"]
    assert row["preset"] == "tiny" and row["backend"] == "reference"
    assert (row["recompute"], full["recompute"]) == ("none", "full")
    assert row["first_losses"] == full["first_losses"]          # recompute changes memory, not the numbers
    assert row["tokens_per_s"] > 0 and row["timed_steps"] == 3
    assert set(row["breakdown_median_s"]) == {"data", "forward_backward", "optimizer"}
    assert all(v >= 0 for v in row["breakdown_median_s"].values())
    assert "| tiny | reference | full |" in path.with_suffix(".md").read_text()
