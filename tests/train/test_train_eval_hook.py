"""Evaluation every N steps during training goes through evals/ (the same code as launchers/eval.py)."""
import json

from tests.distributed import run_ranks


def test_eval_every_n_steps(tmp_path):
    run_ranks(2, "tests.workers:train_with_eval", str(tmp_path))  # DP=2
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= v <= 1.0 for v in evals[0]["eval"].values() if not isinstance(v, dict))
    assert any(k.startswith("sSC") for k in evals[0]["eval"]), evals[0]["eval"].keys()
    results = [json.loads(l) for l in open(tmp_path / "run" / "evals" / "results.jsonl")]
    assert [r["step"] for r in results] == [2, 4]
