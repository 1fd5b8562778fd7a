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
