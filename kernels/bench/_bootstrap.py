"""Imported by every bench script before anything that imports triton.

``--dry-run`` on a machine without CUDA means: run the Triton kernels through the interpreter, which
must be switched on before any ``@triton.jit`` function is defined.  ``kernels/__init__`` and
``kernels/bench/__init__`` import no triton, so ``from kernels.bench import _bootstrap`` is safe first.
"""
import os
import sys

if "--dry-run" in sys.argv:
    import torch  # torch alone does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
