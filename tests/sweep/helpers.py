"""A tiny 2 sizes x 2 recipes sweep spec over a small synthetic world (shared by the sweep tests)."""
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
SWEEP = os.path.join(ROOT, "launchers", "sweep.py")

# 4 sequences x 64 tokens = 256 tokens per step; the budget is not a multiple of it (partial last steps)
BUDGET = 256 * 10 + 100


def tiny_spec(tmp, executor=None, **extra):
    v = ["--codebook-size", "128", "-q"]
    spec = {
        "name": "tiny-test",
        "output_dir": os.path.join(str(tmp), "sweep"),
        "base": os.path.join(ROOT, "configs", "tiny.yaml"),
        "sizes": [{"name": "xs", "num_layers": 1, "hidden_size": 32}, {"name": "s", "num_layers": 2, "hidden_size": 32}],
        "recipes": ["en_fr", "interleaving"],
        "budgets": [BUDGET],
        "seeds": [7],
        "overrides": ["model.seq_length=64", "schedule.micro_batch_size=4", "schedule.global_batch_size=4",
                      "checkpoint.interval=3", "checkpoint.keep_last=1", "logging.interval=5"],
        "datasets": {
            "world": {"kind": "files", "prefix": "{data}/world",
                      "build": ["world", "{data}/world", "--stories", "200", "--bench-items", "6", "--bench-context", "1",
                                "--valid-stories", "20", "--seed", "3"]},
            "bench": {"kind": "files", "prefix": "{data}/world/bench", "needs": ["world"]},
            "en": {"prefix": "{data}/en", "needs": ["world"],
                   "build": ["build", "-i", "{data}/world/stories.jsonl", "-o", "{data}/en", "--mode", "mono", "--lang", "en"] + v},
            "fr": {"prefix": "{data}/fr", "needs": ["world"],
                   "build": ["build", "-i", "{data}/world/stories.jsonl", "-o", "{data}/fr", "--mode", "mono", "--lang", "fr"] + v},
            "valid": {"prefix": "{data}/valid", "needs": ["world"],
                      "build": ["build", "-i", "{data}/world/valid.jsonl", "-o", "{data}/valid", "--mode", "story-random",
                                "--p", "0.5"] + v},
            "interleaved": {"prefix": "{data}/inter_p{p}", "needs": ["world"],
                            "build": ["build", "-i", "{data}/world/stories.jsonl", "-o", "{data}/inter_p{p}", "--mode",
                                      "random", "--p", "{p}"] + v},
        },
        "benchmarks": ["bench"],
        "valid": ["valid"], "valid_interval": 5, "valid_sequences": 4,
        "eval_overrides": ["eval.scoring=mean_continuation", "eval.batch_size=64"],
        "executor": executor or {"kind": "local"},
        "throughput": {"tokens_per_s": 20000, "reference": "xs", "device": "2 CPU cores"},
    }
    spec.update(extra)
    path = os.path.join(str(tmp), "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def sweep(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([PY, SWEEP, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)
