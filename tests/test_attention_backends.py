"""Attention backends through the whole model, and megatron-core's memory levers (recompute, sequence parallel).

* ``model.attention_backend`` reaches every layer; ``auto`` on CPU is SDPA; flex's logits through a whole model
  equal the reference's (forward only: FlexAttention has no backward on CPU); training on CPU with flex is
  refused in one line before any process group exists.
* Recompute (selective, full uniform, full block) and sequence parallelism (TP=2) reproduce today's path:
  the same losses and gradient norms over 3 optimizer steps, and the same per-parameter full gradients of
  one backward (a sequence-parallel norm whose TP all-reduce were missing would differ here).
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["schedule.global_batch_size=4", "schedule.micro_batch_size=2", "model.seq_length=64"]
RTOL = 1e-5


def _close(a, b, rtol):
    return all(abs(x - y) <= rtol * abs(y) + 1e-12 for x, y in zip(a, b))


def test_flex_logits_equal_reference_through_the_model():
    layouts = [SMALL + ["model.attention_backend=reference"], SMALL + ["model.attention_backend=flex"],
               SMALL + ["model.attention_backend=sdpa"], SMALL]
    [res] = run_ranks(1, "tests.workers:logits_for_layouts", TINY, layouts)
    ref, flex, sdpa, auto = res
    assert ref["backends"] == ["reference"] and flex["backends"] == ["flex"] and sdpa["backends"] == ["sdpa"]
    assert auto["backends"] == ["sdpa"]                     # auto on CPU
    want = torch.tensor(ref["logits"])
    for other in (flex, sdpa):
        err = float((torch.tensor(other["logits"]) - want).abs().max())
        assert err <= 1e-5 * float(want.abs().max()), (other["layout"], err)


def test_cpu_training_with_flex_is_one_line():
    out = subprocess.run([sys.executable, "launchers/pretrain.py", "model.attention_backend=flex"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.attention_backend: expected auto, sdpa, triton or reference "
                                "without a GPU"), lines[-3:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def one_rank():
    layouts = [SMALL, SMALL + ["model.recompute=selective"], SMALL + ["model.recompute=full"],
               SMALL + ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"],
               SMALL + ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"]]
    [losses] = run_ranks(1, "tests.workers:losses_for_layouts", TINY, layouts, 3)
    [grads] = run_ranks(1, "tests.workers:grads_for_layouts", TINY, layouts[:3])
    return losses, grads


def test_recompute_modes_reproduce_losses(one_rank):
    losses, _ = one_rank
    ref = losses[0]
    assert ref["losses"][-1] < ref["losses"][0]
    for r in losses[1:]:
        assert _close(r["losses"], ref["losses"], RTOL), (r["layout"], r["losses"], ref["losses"])
        assert _close(r["grad_norms"], ref["grad_norms"], 1e-4), (r["layout"], r["grad_norms"])


def test_recompute_modes_reproduce_every_gradient(one_rank):
    _, grads = one_rank
    ref = grads[0]["grad_norms"]
    for r in grads[1:]:
        assert r["grad_norms"].keys() == ref.keys()
        for name, g in ref.items():
            assert abs(r["grad_norms"][name] - g) <= 1e-5 * g + 1e-9, (r["layout"], name, r["grad_norms"][name], g)


def test_sequence_parallel_reproduces_tp2(one_rank):
    _, grads1 = one_rank
    tp = SMALL + ["parallel.tensor=2"]
    sp = tp + ["parallel.sequence_parallel=true"]
    layouts = [tp, sp, sp + ["model.recompute=full"], sp + ["model.recompute=selective"]]
    res = run_ranks(2, "tests.workers:losses_for_layouts", TINY, layouts, 3)
    grads = run_ranks(2, "tests.workers:grads_for_layouts", TINY, [tp, sp])
    ref = res[0][0]
    for rank in res:
        for r in rank:
            assert _close(r["losses"], ref["losses"], RTOL), (r["layout"], r["losses"], ref["losses"])
            assert _close(r["grad_norms"], ref["grad_norms"], 1e-4), (r["layout"], r["grad_norms"])
    one = grads1[0]["grad_norms"]
    for rank in grads:                                       # both TP ranks hold whole norm gradients
        for r in rank:
            for name, g in one.items():
                assert abs(r["grad_norms"][name] - g) <= 1e-5 * g + 1e-9, (r["layout"], name, r["grad_norms"][name], g)
