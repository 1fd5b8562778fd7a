"""Triton kernels for megaslm (imports only torch and triton).

Public API (each op dispatches to Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else to its
plain-torch reference; ``force="triton" | "reference"`` overrides):

* :func:`fused_unit_embedding` / :func:`embedding_reference` (its module in a model:
  ``megaslm.layers.UnitVocabParallelEmbedding``, megatron-core's vocab-parallel embedding over it)
* :func:`segment_attention` / :func:`segment_attention_reference`
* :func:`doc_positions_and_masks` / :func:`doc_positions_and_masks_reference`
* :func:`use_triton`

Importing this package never launches a kernel, so it works on a CPU-only machine, and imports neither torch
nor triton: torch-free code may import its standard-library modules (``kernels.choice``,
``kernels.bench.record``).  The kernel modules (and so torch and triton) are imported lazily on first attribute
access: ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so scripts (``kernels.bench``)
can still set it after importing the package itself.
"""
import importlib

_LAZY = {
    "use_triton": ".dispatch",
    "interpreting": ".dispatch",
    "fused_unit_embedding": ".embedding",
    "embedding_reference": ".embedding",
    "segment_attention": ".attention",
    "segment_attention_reference": ".attention",
    "doc_positions_and_masks": ".doc_mask",
    "doc_positions_and_masks_reference": ".doc_mask",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
