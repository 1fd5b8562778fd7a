"""Fused position ids / segment ids / loss mask against the reference and megatron's loop semantics."""

import pytest
import torch

from kernels import doc_mask as dm
from kernels import doc_positions_and_masks, doc_positions_and_masks_reference
from _kernels_testutil import gpu, requires_cuda

EOD, PAD = 0, 7


def _megatron_loop(tokens, eod_id, pad_id, mask_eod_loss):
    """Megatron's get_ltor_masks_and_position_ids (reset positions / attention, eod loss) as a loop."""
    B, S = tokens.shape
    pos = torch.arange(S).repeat(B, 1)
    seg = torch.zeros(B, S, dtype=torch.int32)
    loss = torch.ones(B, S)
    if mask_eod_loss:
        loss[tokens == eod_id] = 0.0
    if pad_id is not None:
        loss[tokens == pad_id] = 0.0
    for b in range(B):
        prev = 0
        for i in (tokens[b] == eod_id).nonzero().flatten().tolist():
            pos[b, i + 1:] -= i + 1 - prev
            seg[b, i + 1:] += 1
            prev = i + 1
    return pos, seg, loss


def _check(tokens, pad_id=PAD, mask_eod_loss=True):
    got = doc_positions_and_masks(tokens, EOD, pad_id=pad_id, mask_eod_loss=mask_eod_loss, force="triton")
    ref = doc_positions_and_masks_reference(tokens, EOD, pad_id=pad_id, mask_eod_loss=mask_eod_loss)
    loop = _megatron_loop(tokens.cpu(), EOD, pad_id, mask_eod_loss)
    for g, r, lp, dtype in zip(got, ref, loop, (torch.int64, torch.int32, torch.float32)):
        assert g.dtype == dtype and r.dtype == dtype
        assert torch.equal(g, r)
        assert torch.equal(r.cpu(), lp.to(dtype))
    return got


@pytest.mark.parametrize("B,S", [(3, 37), (1, 1), (2, 130)])
@pytest.mark.parametrize("mask_eod_loss", [True, False])
def test_random_rows(device, B, S, mask_eod_loss):
    gen = torch.Generator().manual_seed(S)
    tokens = torch.randint(0, 9, (B, S), generator=gen).to(device)  # eod ~1/9: many short docs
    _check(tokens, mask_eod_loss=mask_eod_loss)
    _check(tokens, pad_id=None, mask_eod_loss=mask_eod_loss)


def test_edge_layouts(device):
    S = 23
    rows = torch.randint(1, 7, (5, S))
    rows[1, 0] = EOD           # eod first: a length-1 first document
    rows[1, -1] = EOD          # eod last: nothing starts after it
    rows[2, 5:9] = EOD         # consecutive eods: length-1 documents
    rows[3, :] = EOD           # every token its own document
    rows[4, -3:] = PAD         # trailing padding, one document filling the row
    pos, seg, loss = _check(rows.to(device))
    assert seg[4].max() == 0 and torch.equal(pos[4].cpu(), torch.arange(S))
    assert torch.equal(seg[3].cpu(), torch.arange(S, dtype=torch.int32))
    assert torch.equal(pos[3].cpu(), torch.zeros(S, dtype=torch.int64))
    assert loss[4, -3:].sum() == 0 and loss[3].sum() == 0


def test_eod_equals_pad(device):
    tokens = torch.randint(0, 4, (2, 40)).to(device)
    _check(tokens, pad_id=EOD, mask_eod_loss=False)


def test_carry_across_chunks(device, monkeypatch):
    """Small chunks so documents cross the kernel's chunk boundaries."""
    monkeypatch.setattr(dm, "_BLOCK_INTERPRET", 16)
    monkeypatch.setattr(dm, "_BLOCK_GPU", 16)
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(1, 30, (3, 101), generator=gen)
    tokens[0, 15] = EOD  # document boundary right at a chunk boundary
    tokens[0, 16] = EOD
    tokens[1, 31:33] = EOD
    tokens[2] = 5        # one document spanning every chunk
    _check(tokens.to(device))


def test_noncontiguous_and_dispatch(device):
    tokens = torch.randint(0, 5, (40, 3)).to(device).t()  # [3, 40] with row stride 1? no: column view
    _check(tokens)
    ref = doc_positions_and_masks(tokens, EOD, force="reference")
    assert all(torch.equal(a, b) for a, b in zip(ref, doc_positions_and_masks(tokens, EOD)))
    with pytest.raises(ValueError):
        doc_positions_and_masks(tokens[0], EOD)


@gpu
@requires_cuda
def test_gpu_long_rows():
    tokens = torch.randint(0, 200, (75, 8192), device="cuda")
    got = doc_positions_and_masks(tokens, EOD, pad_id=PAD)
    ref = doc_positions_and_masks_reference(tokens, EOD, pad_id=PAD)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
