"""The package imports and falls back to the references on a CPU machine without TRITON_INTERPRET."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

_SNIPPET = r"""
import sys, torch, kernels
assert "triton" not in sys.modules  # lazy: nothing heavy at package import
ids = torch.randint(0, 10, (2, 5)); w = torch.randn(10, 8, requires_grad=True)
assert not kernels.use_triton(w)
kernels.fused_unit_embedding(ids, w, 0).sum().backward()
pos, seg, loss = kernels.doc_positions_and_masks(ids, 3)
q = torch.randn(2, 5, 2, 16, requires_grad=True)
kernels.segment_attention(q, q, q, seg).sum().backward()
import kernels.attention, kernels.embedding, kernels.doc_mask  # triton imports fine without a GPU
import kernels.bench.bench_all  # benchmark plumbing imports
try:
    kernels.segment_attention(q, q, q, seg, force="triton")
except RuntimeError:
    pass
else:
    raise AssertionError("force='triton' without CUDA or interpreter must refuse")
print("ok")
"""


def test_cpu_import_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_bench_cli_requires_cuda():
    if torch.cuda.is_available():
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.bench.bench_doc_mask"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "need a CUDA device" in out.stderr and len(out.stderr.strip().splitlines()) == 1
