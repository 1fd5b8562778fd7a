"""Every parallel layout reproduces the single-process losses (fixed batch, fp32, >= 3 optimizer steps).

One spawned group per world size checks several layouts in turn (a launch costs seconds on 2 cores).
"""
import os

import pytest

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 3
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    [res] = run_ranks(1, "tests.workers:losses_for_layouts", TINY, [["parallel.data=1"]], STEPS)
    ref = res[0]
    assert len(ref["losses"]) == STEPS
    assert ref["losses"][-1] < ref["losses"][0]  # it is actually training
    return ref


def _close(a, b, rtol=RTOL):
    return all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


def _check(results, reference):
    for r in results:
        assert _close(r["losses"], reference["losses"]), (r["layout"], r["losses"], reference["losses"])
        assert _close(r["grad_norms"], reference["grad_norms"], 1e-4), (r["layout"], r["grad_norms"], reference["grad_norms"])


def test_two_ranks_tp_dp_zero_pp(reference):
    layouts = [
        ["parallel.tensor=2"],
        ["parallel.zero_stage=1"],
        ["parallel.zero_stage=2"],
        ["parallel.zero_stage=3"],
        ["parallel.zero_stage=0"],
        ["parallel.pipeline=2"],
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    ]
    results = run_ranks(2, "tests.workers:losses_for_layouts", TINY, layouts, STEPS)
    for rank_results in results:  # every rank agrees on the loss
        _check(rank_results, reference)


def test_four_ranks_tp_pp_dp(reference):
    layouts = [
        ["parallel.tensor=2", "parallel.pipeline=2"],
        ["parallel.pipeline=2", "parallel.zero_stage=1"],          # PP=2 x DP=2
        ["parallel.tensor=2", "parallel.zero_stage=2"],            # TP=2 x DP=2
    ]
    results = run_ranks(4, "tests.workers:losses_for_layouts", TINY, layouts, STEPS)
    _check(results[0], reference)
    _check(results[-1], reference)


def test_untied_embeddings_pipeline():
    """Untied output layer, PP=2 vs PP=1 (the tied case is covered above)."""
    [ref] = run_ranks(1, "tests.workers:losses_for_layouts", TINY, [["model.tie_embeddings=false"]], STEPS)
    res = run_ranks(2, "tests.workers:losses_for_layouts", TINY,
                    [["model.tie_embeddings=false", "parallel.pipeline=2"],
                     ["model.tie_embeddings=false", "parallel.tensor=2"]], STEPS)
    _check(res[0], ref[0])
