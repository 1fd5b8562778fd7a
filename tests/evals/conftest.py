import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny run trained once for the evals tests (40 steps, checkpoints at 20 and 40) and a benchmark
    made from its stories; shared by the layout, launcher and sampling tests."""
    from tests.distributed import run_ranks

    d = tmp_path_factory.mktemp("evals")
    run = str(d / "run")
    run_ranks(1, "tests.evals.eval_workers:train_tiny", run, 40, 20)
    from megaslm.vocab import UnitVocab
    from evals.synthetic import build_benchmark, read_stories

    bench = str(d / "bench")
    build_benchmark(read_stories(os.path.join(run, "data", "stories.jsonl")), bench, UnitVocab(codebook_size=128), 40)
    return {"dir": d, "run": run, "bench": bench, "ckpt": os.path.join(run, "checkpoints", "step00000040")}
