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

# Attention block sizes per architecture: (BLOCK_M, BLOCK_N, num_warps, num_stages).  The first entry
# of each list is the default (used without autotuning, in deterministic mode, and for fp32).
# Forward: BLOCK_M query rows per program, BLOCK_N keys per loop step.  Backward: the dk/dv program
# holds BLOCK_N keys and loops over BLOCK_M-row query blocks; the deterministic dq program holds
# BLOCK_M queries and loops over BLOCK_N-key blocks (one block table serves both).
_ATTN_FWD = {
    90: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    80: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
}
_ATTN_FWD_D128 = {
    90: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    80: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
}
_ATTN_BWD = {
    90: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
    80: [(32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
}
_ATTN_BWD_D128 = {
    90: [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3)],
    80: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
}
_ATTN_FP32 = {"fwd": (64, 32, 4, 2), "bwd": (32, 32, 4, 2)}  # fp32 (ieee dots): one config, no tuning


def arch_of(device=None) -> int:
    """The config-space key of a CUDA device: 90 for Hopper and newer, else 80."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def attention_space(kind: str, arch: int, head_dim: int, dtype) -> list:
    """Autotune space of the attention ``kind`` ("fwd" | "bwd") as a list of dicts; [0] is the default."""
    dt = str(dtype).replace("torch.", "")
    if dt == "float32":
        cands = [_ATTN_FP32[kind]]
    else:
        big = head_dim > 64
        table = {("fwd", False): _ATTN_FWD, ("fwd", True): _ATTN_FWD_D128,
                 ("bwd", False): _ATTN_BWD, ("bwd", True): _ATTN_BWD_D128}[(kind, big)]
        cands = table[80 if arch < 90 else 90]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for (m, n, w, s) in cands]
