"""Choosing between the Triton path and the plain-torch reference path.

The rule is deliberately small:

* ``force="triton"`` / ``force="reference"`` win (tests and benchmarks);
* otherwise the Triton path runs when the tensor lives on a CUDA device, or when
  ``TRITON_INTERPRET=1`` is set in the environment (CPU tests run the kernels
  through Triton's interpreter);
* everything else (plain CPU runs) uses the torch reference.

Importing this module (and the kernel modules) never launches anything, so the
package imports on a machine with no GPU and no ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_FORCE_VALUES = (None, "triton", "reference")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton path should run for a tensor ``t``."""
    return bool(t.is_cuda) or interpreting()


def resolve(force: Optional[str], t: torch.Tensor) -> bool:
    """Return True for the Triton path, False for the reference path."""
    if force not in _FORCE_VALUES:
        raise ValueError(f"force must be one of {_FORCE_VALUES}, got {force!r}")
    if force == "reference":
        return False
    if force == "triton":
        if not (t.is_cuda or interpreting()):
            raise RuntimeError(
                "force='triton' needs a CUDA tensor or TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return use_triton(t)


# ----------------------------------------------------------------------------------------------
# The kernel variants the product launches on a GPU -- the ONE list.
#
# The launchers take their GPU block sizes from the functions below (attention autotunes over
# ``attention_space``), and ``python -m kernels.bench.compile_all`` (run by
# tests/kernels_compile) compiles every variant they produce for sm_80 and sm_90 by calling the same
# launchers.  A preset whose shape is not covered by the axes fails tests/kernels/test_variants.py.
# ----------------------------------------------------------------------------------------------
ARCHS = (80, 90)                       # compute capability major*10: Ampere (A100), Hopper (H100/H200)
DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (16, 64, 80, 128)          # 16: the tiny preset; 64: qwen2-360m, llama3.2-1b; 80 / 128: common shapes
GQA_GROUPS = (1, 2, 4, 7)              # query heads per KV head: tiny 4/2, qwen2-360m 14/2, llama3.2-1b 32/8, MHA
HIDDEN_SIZES = (64, 896, 2048)         # embedding widths: tiny, qwen2-360m, llama3.2-1b
DETERMINISTIC = (False, True)
EMBED_LANGS = (0, 2)                   # language-table rows (0: none, as megaslm's layers call it)

# Attention block sizes per architecture.  Forward entries: (BLOCK_M, BLOCK_N, num_warps, num_stages) --
# BLOCK_M query rows per program, BLOCK_N keys per loop step.  Backward entries add ATOMIC_DQ: True is the
# FA2 single pass (dk/dv program also adds dq with atomics, 5 matmuls), False the split pass (dk/dv
# program + a dq program, 7 matmuls, no atomics).  The dk/dv program holds BLOCK_N keys and loops over
# BLOCK_M-row query blocks; the dq program holds BLOCK_M queries (one block table serves both).
# The first entry of each list is the default; ``deterministic=True`` uses it with ATOMIC_DQ forced off.
# Only TUNED_DTYPES x TUNED_HEAD_DIMS (what the presets train with on a GPU) are autotuned over the whole
# list; every other (dtype, head dim) runs the default alone, which keeps the compile check's cost down.
# Entries chosen so that ptxas reports no or few spills (docs/bench/compile_all-triton-3.9.0.md).
TUNED_DTYPES = ("bfloat16",)
TUNED_HEAD_DIMS = (64, 128)
_ATTN = {
    ("fwd", 90, "small"): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    ("fwd", 90, "big"): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    ("fwd", 80, "small"): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 80, "big"): [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("bwd", 90, "small"): [(32, 128, 8, 2, True), (64, 64, 8, 2, True), (32, 128, 8, 2, False)],
    ("bwd", 90, "big"): [(16, 64, 8, 2, True), (16, 128, 8, 2, True), (16, 64, 8, 2, False)],
    ("bwd", 80, "small"): [(32, 128, 8, 2, True), (16, 128, 8, 2, True), (32, 128, 8, 2, False)],
    ("bwd", 80, "big"): [(32, 64, 8, 2, True), (16, 128, 8, 2, False), (32, 64, 8, 2, False)],
}
_ATTN_FP32 = {"fwd": [(64, 32, 4, 2)], "bwd": [(32, 32, 4, 2, False)]}  # ieee fp32 dots: one config


def arch_of(device=None) -> int:
    """The config-space key of a CUDA device: 90 for Hopper and newer, else 80."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def attention_space(kind: str, arch: int, head_dim: int, dtype, deterministic: bool = False) -> list:
    """Block-size configs the attention launcher ``kind`` ("fwd" | "bwd") may use; [0] is the default.

    Dicts with BLOCK_M, BLOCK_N, num_warps, num_stages (and ATOMIC_DQ for "bwd").  ``deterministic``
    (backward only): the single default config without atomics.
    """
    dt = str(dtype).replace("torch.", "")
    if dt == "float32":
        cands = _ATTN_FP32[kind]
    else:
        cands = _ATTN[(kind, 80 if arch < 90 else 90, "big" if head_dim > 64 else "small")]
        if dt not in TUNED_DTYPES or head_dim not in TUNED_HEAD_DIMS:
            # untuned: the default alone; its backward without atomics, i.e. the very kernels the
            # deterministic mode compiles (half the compile-check cost of these classes)
            cands = [cands[0][:4] + ((False,) if kind == "bwd" else ())]
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ATOMIC_DQ")
    out = [dict(zip(keys, c)) for c in cands]
    if kind == "bwd" and deterministic:
        out = [dict(out[0], ATOMIC_DQ=False)]
    return out
