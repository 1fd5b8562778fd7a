"""Evaluation every N steps during training goes through evals/ (the same code as launchers/eval.py)."""
import json
import os

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_with_eval(out_dir: str):
    from data_tools.synthetic import write_demo_corpus
    from evals.synthetic import build_benchmark, read_stories
    from megaslm.config import load_config
    from megaslm.train import run

    data = os.path.join(out_dir, "data")
    prefixes = write_demo_corpus(data, seed=0, num_stories=120, codebook_size=128)
    cfg0 = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    bench = os.path.join(out_dir, "bench")
    build_benchmark(read_stories(os.path.join(data, "stories.jsonl")), bench, cfg0.vocab, items_per_task=6)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [
        f"output_dir={out_dir}/run", "data.demo=false", "schedule.stages.0.train_steps=4",
        f"schedule.stages.0.data=[{{path: {prefixes['enfr_interleaved']}, weight: 1.0}}]",
        "eval.interval=2", f"eval.benchmarks=[{bench}]", "eval.batch_size=8", "checkpoint.save=false"])
    run(cfg, log=lambda *_: None)
    return True


def test_eval_every_n_steps(tmp_path):
    run_ranks(2, "tests.train.test_train_eval_hook:train_with_eval", str(tmp_path))  # DP=2
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= v <= 1.0 for v in evals[0]["eval"].values() if not isinstance(v, dict))
    assert any(k.startswith("sSC") for k in evals[0]["eval"]), evals[0]["eval"].keys()
    results = [json.loads(l) for l in open(tmp_path / "run" / "evals" / "results.jsonl")]
    assert [r["step"] for r in results] == [2, 4]
