"""Position ids, segment ids and loss mask of packed sequences, in one pass.

Megatron's semantics (``get_ltor_masks_and_position_ids`` with ``reset_position_ids``,
``reset_attention_mask`` and ``eod_mask_loss``):

* a new document starts at position 0 of the row and at the token AFTER each ``eod`` (the eod
  token belongs to the document it ends);
* ``position_ids`` restart at 0 at every document start;
* ``segment_ids`` number the documents of a row from 0 (feed them to
  :func:`kernels.attention.segment_attention`, which masks by equality plus causality --
  exactly megatron's reset attention mask);
* ``loss_mask`` is 0 where the INPUT token is ``eod`` (when ``mask_eod_loss``) or ``pad_id``, else 1.

The Triton kernel runs one program per row, walking the row in chunks with a carried
(segment count, last document start): a ``cumsum`` gives the segment ids and a max-scan of
document-start indices gives the positions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, resolve

__all__ = ["doc_positions_and_masks", "doc_positions_and_masks_reference"]

# chunk length per loop step of the kernel (tests shrink the interpreter's to exercise the carry)
_BLOCK_GPU = 1024
_BLOCK_INTERPRET = 4096


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _doc_mask_kernel(
    tok_ptr, pos_ptr, seg_ptr, loss_ptr,
    S, stride_tok, stride_out,
    eod_id, pad_id,
    HAS_PAD: tl.constexpr, MASK_EOD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tok_row = tok_ptr + row * stride_tok
    out_off = row * stride_out
    carry_seg = tl.zeros([], dtype=tl.int32) - 1
    carry_start = tl.zeros([], dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        m = offs < S
        tok = tl.load(tok_row + offs, mask=m, other=0)
        prev = tl.load(tok_row + offs - 1, mask=m & (offs > 0), other=0)
        is_start = ((offs == 0) | (prev == eod_id)) & m
        seg = tl.cumsum(is_start.to(tl.int32), axis=0) + carry_seg
        last = tl.associative_scan(tl.where(is_start, offs, -1), 0, _max_combine)
        last = tl.maximum(last, carry_start)
        pos = offs - last
        keep = m
        if MASK_EOD:
            keep = keep & (tok != eod_id)
        if HAS_PAD:
            keep = keep & (tok != pad_id)
        tl.store(pos_ptr + out_off + offs, pos.to(tl.int64), mask=m)
        tl.store(seg_ptr + out_off + offs, seg, mask=m)
        tl.store(loss_ptr + out_off + offs, keep.to(tl.float32), mask=m)
        carry_seg = tl.max(tl.where(m, seg, -1), axis=0)
        carry_start = tl.max(last, axis=0)


def doc_positions_and_masks_reference(tokens: torch.Tensor, eod_id: int, pad_id: Optional[int] = None,
                                      mask_eod_loss: bool = True, force: Optional[str] = None
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch reference.  ``force`` is accepted for signature compatibility and ignored."""
    if tokens.dim() != 2:
        raise ValueError("tokens must be [B, S]")
    B, S = tokens.shape
    is_eod = tokens == eod_id
    start = torch.zeros_like(is_eod)
    if S > 0:
        start[:, 0] = True
        start[:, 1:] = is_eod[:, :-1]
    segment_ids = (torch.cumsum(start.to(torch.int32), dim=1) - 1).to(torch.int32)
    idx = torch.arange(S, device=tokens.device).expand(B, S)
    last = torch.where(start, idx, torch.zeros_like(idx))
    if S > 0:
        last = torch.cummax(last, dim=1).values
    position_ids = (idx - last).to(torch.int64)
    keep = torch.ones_like(is_eod)
    if mask_eod_loss:
        keep &= ~is_eod
    if pad_id is not None:
        keep &= tokens != pad_id
    return position_ids, segment_ids, keep.to(torch.float32)


def doc_positions_and_masks(tokens: torch.Tensor, eod_id: int, pad_id: Optional[int] = None,
                            mask_eod_loss: bool = True, force: Optional[str] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position_ids int64 [B,S], segment_ids int32 [B,S], loss_mask float32 [B,S]) for packed rows."""
    if tokens.dim() != 2:
        raise ValueError("tokens must be [B, S]")
    if tokens.dtype.is_floating_point:
        raise TypeError("tokens must be an integer tensor")
    if not resolve(force, tokens):
        return doc_positions_and_masks_reference(tokens, eod_id, pad_id, mask_eod_loss)
    return _doc_mask_launch(tokens, eod_id, pad_id, mask_eod_loss)


def _doc_mask_launch(tokens: torch.Tensor, eod_id: int, pad_id: Optional[int], mask_eod_loss: bool):
    """The Triton launch (GPU block: 1024-token chunks, or the whole row when shorter)."""
    B, S = tokens.shape
    dev = tokens.device
    pos = torch.empty((B, S), dtype=torch.int64, device=dev)
    seg = torch.empty((B, S), dtype=torch.int32, device=dev)
    loss = torch.empty((B, S), dtype=torch.float32, device=dev)
    if B == 0 or S == 0:
        return pos, seg, loss
    tok = tokens if tokens.stride(1) == 1 else tokens.contiguous()
    block = min(triton.next_power_of_2(S), _BLOCK_INTERPRET if interpreting() else _BLOCK_GPU)
    _doc_mask_kernel[(B,)](
        tok, pos, seg, loss, S, tok.stride(0), S,
        int(eod_id), int(pad_id) if pad_id is not None else 0,
        HAS_PAD=pad_id is not None, MASK_EOD=bool(mask_eod_loss), BLOCK=block,
        num_warps=4,
    )
    return pos, seg, loss
