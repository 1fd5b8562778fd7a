"""Document-masked causal attention through PyTorch's own kernels: FlexAttention and SDPA.

These are the proven paths (PyTorch tests them on every GPU generation it supports); the Triton kernel
in :mod:`kernels.attention` earns the default only through a stored side-by-side GPU measurement
(:mod:`kernels.choice`).  Same contract as :func:`kernels.attention.segment_attention`: q ``[B, S, Hq, D]``,
k/v ``[B, S, Hkv, D]`` (any strides), segment ids ``[B, S]``; query ``i`` attends key ``j`` iff ``j <= i`` and
both carry the same segment id.

**flex** (:func:`flex_segment_attention`): a ``BlockMask`` built ONCE per batch from the segment ids
(:func:`document_block_mask`, cached on the segment-id tensor exactly like the Triton block table, so
every layer of a step shares it) and GQA through ``enable_gqa``.  On CUDA the call goes through one
``torch.compile(flex_attention, dynamic=False)`` made once per process.  No recompiles from step to step:
dynamo guards the BlockMask's tensors by shape / dtype / stride (not by value), and its ``mask_mod`` by
code object plus the shape of the segment tensor it closes over -- every batch's ``mask_mod`` comes from the
same factory (:func:`_document_causal`), so a new batch of the same shape reuses the compiled graph; a
new shape (another micro-batch size or sequence length) compiles once more.  The test that proves it
counts the graphs a compile backend receives (tests/kernels/test_flex.py).  FlexAttention has no
backward on CPU; there the forward runs eagerly (evaluation, tests).

**sdpa** (:func:`sdpa_segment_attention`): ``scaled_dot_product_attention`` with a boolean ``[B, 1, S, S]``
document mask (built once per batch and cached the same way).  The fastest correct CPU training path
(measured by ``launchers/bench_trainer_cpu.py``, see README: Performance); on a GPU a boolean mask forces
SDPA's memory-efficient or math kernel, so there it is a fallback, not the default.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["flex_segment_attention", "document_block_mask", "sdpa_segment_attention", "document_mask",
           "FLEX_BLOCK_SIZE"]

FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile; the BlockMask's granularity

_compiled_flex = None


def _cache_of(segment_ids: torch.Tensor) -> dict:
    from .attention import _cache_of as cache_of  # one per-tensor cache for every backend's mask

    return cache_of(segment_ids)


def _document_causal(seg: torch.Tensor):
    """The mask_mod of a document-masked causal attention over segment ids ``seg`` [B, S]."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (seg[b, q_idx] == seg[b, kv_idx])

    return mask_mod


def document_block_mask(segment_ids: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE):
    """The FlexAttention ``BlockMask`` of ``segment_ids`` [B, S], built once and cached on the tensor.

    Built by FlexAttention's own ``create_block_mask`` (fully masked blocks skipped, full blocks run without
    the mask_mod, partial blocks with it); one head dimension (``H=None``): every head shares the mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    cache = _cache_of(segment_ids)
    key = ("flex", block_size)
    if key not in cache:
        B, S = segment_ids.shape
        cache[key] = create_block_mask(_document_causal(segment_ids), B, None, S, S,
                                       device=segment_ids.device, BLOCK_SIZE=block_size)
    return cache[key]


def _flex_fn(device_type: str):
    """The flex_attention callable for a device: compiled once per process on CUDA, eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_segment_attention(q, k, v, segment_ids, softmax_scale: Optional[float] = None, fn=None):
    """Document-masked causal attention through FlexAttention; q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D].

    ``fn``: the flex_attention callable to use (tests pass a compiled one with a counting backend)."""
    _check(q, k, v, segment_ids)
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                               or v.requires_grad):
        raise RuntimeError("model.attention_backend=flex: PyTorch's FlexAttention has no backward on CPU; "
                           "train on CPU with attention_backend auto, sdpa or reference")
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    block_mask = document_block_mask(segment_ids)
    call = fn if fn is not None else _flex_fn(q.device.type)
    out = call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
               enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask (True = attend), built once per segment-id tensor and cached on it."""
    cache = _cache_of(segment_ids)
    if "dense_bool" not in cache:
        S = segment_ids.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
        cache["dense_bool"] = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    return cache["dense_bool"]


def sdpa_segment_attention(q, k, v, segment_ids, softmax_scale: Optional[float] = None):
    """Document-masked causal attention through ``F.scaled_dot_product_attention`` and a boolean mask."""
    _check(q, k, v, segment_ids)
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=document_mask(segment_ids), scale=scale,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _check(q, k, v, segment_ids):
    from .attention import _check as check  # the one shape / GQA check every backend shares

    check(q, k, v, segment_ids)
