"""Segment (document) causal attention: output and dq, dk, dv against the dense-mask reference."""

import pytest
import torch

from kernels import attention as attn_mod
from kernels import segment_attention, segment_attention_reference
from _kernels_testutil import assert_close, gpu, requires_cuda

SMALL_BLOCKS = dict(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16)


@pytest.fixture
def blocks(monkeypatch):
    def set_blocks(cfg):
        monkeypatch.setattr(attn_mod, "_CONFIG_OVERRIDE", dict(cfg))
    return set_blocks


def _packed(S, lengths):
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    assert seg.numel() == S
    return seg


def _layout(name, B, S, gen):
    if name == "random_packed":  # sorted random ids: many short segments incl. length 1
        return torch.sort(torch.randint(0, max(2, S // 4), (B, S), generator=gen), dim=1).values
    if name == "length1_and_cross":  # length-1 segments and one crossing the 16 block boundary
        lengths = [1, 1, 8, 1, 12, 3, 1, S - 27]
        return torch.stack([_packed(S, lengths)] * B)
    if name == "single":  # one segment filling the sequence (pure causal, exercises unmasked blocks)
        return torch.zeros(B, S, dtype=torch.long)
    if name == "all_length1":  # every token alone: output == v of its own kv head
        return torch.arange(S).repeat(B, 1)
    if name == "non_monotone":  # correctness must not rely on sorted ids
        return torch.randint(0, 3, (B, S), generator=gen)
    raise KeyError(name)


def _run(B, S, Hq, Hkv, D, seg, device, dtype=torch.float32, scale=None, layout_sbhd=False, seed=0,
         deterministic=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, S, h, D, generator=gen).to(device, dtype)  # noqa: E731
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    if layout_sbhd:  # megatron's [S, B, H, D] memory layout passed as a [B, S, H, D] view
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    seg = seg.to(device)
    go = torch.randn(B, S, Hq, D, generator=gen).to(device, dtype)
    res = []
    for fn, force in ((segment_attention, "triton"), (segment_attention_reference, None)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        kw = {"force": force, "deterministic": deterministic} if force else {}
        out = fn(qq, kk, vv, seg, softmax_scale=scale, **kw)
        out.backward(go)
        res.append((out.detach(), qq.grad, kk.grad, vv.grad))
    return res


def _assert_all(res, atol, rtol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, atol, rtol, name)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["random_packed", "length1_and_cross", "single", "all_length1",
                                    "non_monotone"])
def test_layouts_gqa(device, blocks, layout, deterministic):
    blocks(SMALL_BLOCKS)
    gen = torch.Generator().manual_seed(1)
    B, S = 2, 37
    seg = _layout(layout, B, S, gen)
    res = _run(B, S, 4, 2, 64, seg, device, deterministic=deterministic)
    _assert_all(res, 2e-5, 1e-4)


def test_deterministic_backward_is_bitwise_repeatable(device, blocks):
    blocks(SMALL_BLOCKS)
    gen = torch.Generator().manual_seed(7)
    seg = _layout("random_packed", 2, 45, gen)
    a = _run(2, 45, 4, 2, 64, seg, device, deterministic=True)[0]
    b = _run(2, 45, 4, 2, 64, seg, device, deterministic=True)[0]
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("B,S,Hq,Hkv,D", [
    (1, 37, 2, 2, 24),    # odd head dim (padded to a power-of-two block), plain MHA
    (2, 20, 4, 1, 128),   # head dim 128, multi-query
    (1, 53, 3, 1, 64),    # odd head count, GQA group 3
])
def test_shapes(device, blocks, B, S, Hq, Hkv, D):
    blocks(SMALL_BLOCKS)
    gen = torch.Generator().manual_seed(2)
    seg = _layout("random_packed", B, S, gen)
    _assert_all(_run(B, S, Hq, Hkv, D, seg, device), 2e-5, 1e-4)


def test_default_blocks_scale_layout_int32(device):
    gen = torch.Generator().manual_seed(3)
    seg = _layout("random_packed", 2, 45, gen).to(torch.int32)
    _assert_all(_run(2, 45, 4, 2, 64, seg, device, scale=0.3, layout_sbhd=True), 2e-5, 1e-4)


def test_all_length1_output_is_v(device):
    B, S = 1, 19
    seg = torch.arange(S).repeat(B, 1)
    q = torch.randn(B, S, 2, 64, device=device)
    k = torch.randn(B, S, 1, 64, device=device)
    v = torch.randn(B, S, 1, 64, device=device)
    out = segment_attention(q, k, v, seg, force="triton")
    assert_close(out, v.expand(B, S, 2, 64), 1e-6, 1e-6, "out == v")


def test_block_ranges_skip_masked_blocks():
    """Packed layout: query blocks of later documents start their key loop past earlier documents."""
    S, blk = 128, 16
    seg = _packed(S, [40, 50, 38]).unsqueeze(0)
    tab = attn_mod._build_table(seg, blk, blk)
    kv_lo, kv_flo, kv_fhi, kv_hi = tab.kv[0].unbind(-1)
    q_lo, q_flo, q_fhi, q_hi = tab.q[0].unbind(-1)
    assert kv_lo.tolist() == [0, 0, 0, 2, 2, 2, 5, 5]           # doc 2 starts in block 2, doc 3 in block 5
    assert kv_hi.tolist() == list(range(1, 9))                  # causal: up to the diagonal block
    assert q_hi.tolist() == [3, 3, 6, 6, 6, 8, 8, 8]            # key blocks only seen by their documents
    assert q_lo.tolist() == list(range(8))
    visited = int((kv_hi - kv_lo).sum())
    assert visited == 20 < 8 * 9 // 2  # vs 36 for plain causal
    # full (mask-free) sub-ranges: one-document blocks strictly below the diagonal; empty = [hi, hi)
    assert tab.kv[0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 2], [0, 3, 3, 3], [2, 4, 4, 4], [2, 3, 4, 5],
                                  [2, 6, 6, 6], [5, 7, 7, 7], [5, 6, 7, 8]]
    assert tab.q[0].tolist() == [[0, 1, 2, 3], [1, 3, 3, 3], [2, 6, 6, 6], [3, 4, 5, 6], [4, 6, 6, 6],
                                 [5, 8, 8, 8], [6, 7, 8, 8], [7, 8, 8, 8]]


def test_block_table_non_contiguous_full_blocks_stay_masked():
    """Non-monotone ids: full blocks 0 and 2 of query block 3 are not contiguous -> all visited masked."""
    seg = torch.tensor([[0] * 4 + [1] * 4 + [0] * 8])
    tab = attn_mod._build_table(seg, 4, 4)
    assert tab.kv[0, 3].tolist() == [0, 4, 4, 4]
    assert tab.kv[0, 2].tolist() == [0, 0, 1, 3]  # query block 2: key block 0 full, 1 (other doc) and 2 masked


def test_block_table_built_once_per_batch(device, blocks, monkeypatch):
    """Layers sharing one segment-id tensor share one table build; an in-place change rebuilds it."""
    blocks(SMALL_BLOCKS)
    builds = []
    real = attn_mod._build_table
    monkeypatch.setattr(attn_mod, "_build_table", lambda *a: builds.append(a[1:]) or real(*a))
    gen = torch.Generator().manual_seed(8)
    seg = _layout("random_packed", 2, 40, gen).to(device)  # int64: the int32 copy is cached too
    x = torch.randn(2, 40, 4, 64, generator=gen).to(device).requires_grad_(True)
    kv = torch.randn(2, 40, 2, 64, generator=gen).to(device)
    h = x
    for _ in range(3):  # three "layers"
        h = segment_attention(h, kv, kv, seg, force="triton")
    h.sum().backward()
    assert builds == [(16, 16)]
    seg.add_(0)  # version bump: a new batch written in place must not reuse the old table
    segment_attention(x, kv, kv, seg, force="triton")
    assert builds == [(16, 16), (16, 16)]


def test_input_validation(device):
    q = torch.randn(1, 8, 3, 16, device=device)
    k = torch.randn(1, 8, 2, 16, device=device)
    seg = torch.zeros(1, 8, dtype=torch.long, device=device)
    with pytest.raises(ValueError):
        segment_attention(q, k, k, seg)
    with pytest.raises(ValueError):
        segment_attention(q, q, q, seg[:, :4])
    out = segment_attention(q, q, q, seg, force="reference")
    assert out.shape == q.shape


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", ["random_packed", "single", "non_monotone"])
def test_gpu_low_precision(dtype, D, layout):
    gen = torch.Generator().manual_seed(4)
    B, S = 2, 1000
    seg = _layout(layout, B, S, gen) if layout != "random_packed" else torch.sort(
        torch.randint(0, 12, (B, S), generator=gen), dim=1).values
    res = _run(B, S, 8, 2, D, seg, "cuda", dtype=dtype)
    _assert_all(res, 3e-2, 3e-2)


@gpu
@requires_cuda
def test_gpu_fp32_long():
    gen = torch.Generator().manual_seed(5)
    seg = torch.sort(torch.randint(0, 6, (1, 2048), generator=gen), dim=1).values
    _assert_all(_run(1, 2048, 4, 2, 64, seg, "cuda"), 1e-4, 1e-3)
