"""Fused unit embedding: outputs and every gradient against the plain-torch reference."""

import pytest
import torch

from kernels import embedding_reference, fused_unit_embedding, use_triton
from kernels import embedding as emb_mod
from _kernels_testutil import assert_close, gpu, requires_cuda


def _edge_ids(shape, vocab_start, V, gen, device):
    """Random ids around a shard, with the four shard-edge ids planted at the front."""
    ids = torch.randint(max(0, vocab_start - 5), vocab_start + V + 5, shape, generator=gen).to(device)
    flat = ids.view(-1)
    edges = torch.tensor([vocab_start - 1, vocab_start, vocab_start + V - 1, vocab_start + V], device=device)
    flat[: edges.numel()] = edges
    return ids


def _grads(fn, ids, w, lid, lw, go, **kw):
    w = w.detach().clone().requires_grad_(True)
    lw = lw.detach().clone().requires_grad_(True) if lw is not None else None
    out = fn(ids, w, kw.pop("vocab_start"), lid, lw, **kw)
    out.backward(go)
    return out.detach(), w.grad, (lw.grad if lw is not None else None)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("with_lang", [True, False])
@pytest.mark.parametrize("shape,V,H,vocab_start,scale", [
    ((3, 37), 50, 24, 100, 1.7),      # odd sizes, shard not starting at 0
    ((61,), 33, 40, 1, 1.0),          # 1-D ids, ids == vocab_start - 1 == 0
    ((2, 3, 11), 16, 130, 0, 0.5),    # 3-D ids, H not a power of two and > 128
])
def test_matches_reference(device, shape, V, H, vocab_start, scale, with_lang, deterministic):
    gen = torch.Generator().manual_seed(0)
    ids = _edge_ids(shape, vocab_start, V, gen, device)
    w = torch.randn(V, H, generator=gen).to(device)
    lid = lw = None
    if with_lang:
        L = 3
        lid = torch.randint(-1, L, shape, generator=gen).to(device)  # -1: no language row
        lw = torch.randn(L, H, generator=gen).to(device)
    out_ref = embedding_reference(ids, w, vocab_start, lid, lw, scale=scale)
    go = torch.randn(out_ref.shape, generator=gen).to(device)
    o1, gw1, gl1 = _grads(fused_unit_embedding, ids, w, lid, lw, go, vocab_start=vocab_start, scale=scale,
                          deterministic=deterministic, force="triton")
    o2, gw2, gl2 = _grads(embedding_reference, ids, w, lid, lw, go, vocab_start=vocab_start, scale=scale)
    assert o1.dtype == w.dtype and o1.shape == (*shape, H)
    assert_close(o1, o2, 1e-6, 1e-6, "out")
    assert_close(gw1, gw2, 1e-5, 1e-5, "grad weight")
    # out-of-shard ids contribute nothing, in-shard edge rows do
    assert torch.count_nonzero(o1.reshape(-1, H)[0]) == 0 or vocab_start == 0 or with_lang
    if with_lang:
        assert_close(gl1, gl2, 1e-5, 1e-5, "grad lang")


def test_heavy_repetition_deterministic(device):
    """Few rows hit thousands of times; deterministic mode is bit-reproducible and accurate."""
    gen = torch.Generator().manual_seed(1)
    V, H, N, L = 6, 40, 3000, 2
    ids = torch.randint(0, V + 2, (N,), generator=gen).to(device)  # some ids outside the shard
    ids[: N // 2] = 3  # one row takes half the tokens
    lid = torch.randint(0, L, (N,), generator=gen).to(device)
    w = torch.randn(V, H, generator=gen).to(device)
    lw = torch.randn(L, H, generator=gen).to(device)
    go = torch.randn(N, H, generator=gen).to(device)
    runs = [_grads(fused_unit_embedding, ids, w, lid, lw, go, vocab_start=0, deterministic=True, force="triton")
            for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    # accuracy against a float64 sum
    exp_w = torch.zeros(V, H, dtype=torch.float64, device=device)
    m = ids < V
    exp_w.index_add_(0, ids[m], go[m].double())
    exp_l = torch.zeros(L, H, dtype=torch.float64, device=device).index_add_(0, lid, go.double())
    assert_close(runs[0][1], exp_w, 1e-4, 1e-5, "grad weight")
    assert_close(runs[0][2], exp_l, 1e-4, 1e-5, "grad lang")
    atomic = _grads(fused_unit_embedding, ids, w, lid, lw, go, vocab_start=0, deterministic=False, force="triton")
    assert_close(atomic[1], exp_w, 1e-4, 1e-5, "atomic grad weight")


def test_tensor_parallel_shards_sum_to_full_table(device):
    """Two shards (lang added on one rank only) sum to the unsharded embedding; grads are the slices."""
    gen = torch.Generator().manual_seed(2)
    V, H, L = 20, 24, 2
    ids = torch.randint(0, V, (2, 29), generator=gen).to(device)
    ids[0, :4] = torch.tensor([9, 10, 0, 19])  # both sides of the shard boundary
    lid = torch.randint(0, L, ids.shape, generator=gen).to(device)
    w = torch.randn(V, H, generator=gen).to(device)
    lw = torch.randn(L, H, generator=gen).to(device)
    go = torch.randn(2, 29, H, generator=gen).to(device)
    full = _grads(embedding_reference, ids, w, lid, lw, go, vocab_start=0)
    shard0 = _grads(fused_unit_embedding, ids, w[:10], lid, lw, go, vocab_start=0, add_lang=True, force="triton")
    shard1 = _grads(fused_unit_embedding, ids, w[10:], lid, lw, go, vocab_start=10, add_lang=False,
                    force="triton")
    assert_close(shard0[0] + shard1[0], full[0], 1e-6, 1e-6, "sum of shards")
    assert_close(torch.cat([shard0[1], shard1[1]]), full[1], 1e-5, 1e-5, "weight grads")
    assert_close(shard0[2], full[2], 1e-5, 1e-5, "lang grad on the adding rank")
    assert shard1[2] is None  # plain autograd: the non-adding rank's table gets no gradient
    # ... unless asked to compute the (identical) gradient on every rank
    shard1b = _grads(fused_unit_embedding, ids, w[10:], lid, lw, go, vocab_start=10, add_lang=False,
                     lang_grad_all_ranks=True, force="triton")
    ref1b = _grads(embedding_reference, ids, w[10:], lid, lw, go, vocab_start=10, add_lang=False,
                   lang_grad_all_ranks=True)
    assert_close(shard1b[0], shard1[0], 0, 0, "value unchanged by lang_grad_all_ranks")
    assert_close(shard1b[2], full[2], 1e-5, 1e-5, "all-ranks lang grad")
    assert_close(ref1b[2], full[2], 1e-5, 1e-5, "reference all-ranks lang grad")


def test_many_languages_fallback(device):
    gen = torch.Generator().manual_seed(3)
    V, H, L = 12, 16, emb_mod._MAX_FUSED_LANGS + 3
    ids = torch.randint(0, V, (45,), generator=gen).to(device)
    lid = torch.randint(-1, L, (45,), generator=gen).to(device)
    w = torch.randn(V, H, generator=gen).to(device)
    lw = torch.randn(L, H, generator=gen).to(device)
    go = torch.randn(45, H, generator=gen).to(device)
    a = _grads(fused_unit_embedding, ids, w, lid, lw, go, vocab_start=0, deterministic=True, force="triton")
    b = _grads(embedding_reference, ids, w, lid, lw, go, vocab_start=0)
    for x, y, what in zip(a, b, ("out", "weight", "lang")):
        assert_close(x, y, 1e-5, 1e-5, what)


def test_shard_with_language_table_and_dispatch(device):
    """A vocabulary shard [30, 60) with a language table, as megaslm.layers.UnitVocabParallelEmbedding calls
    the op (the model's module: megatron's vocab-parallel embedding over it, tests/test_kernel_path.py)."""
    torch.manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(30, 24, device=device) * 0.02)
    lang_weight = torch.nn.Parameter(torch.randn(2, 24, device=device) * 0.02)
    ids = torch.randint(25, 65, (2, 13), device=device)
    lid = torch.randint(0, 2, (2, 13), device=device)
    out = fused_unit_embedding(ids, weight, 30, lid, lang_weight, scale=2.0, deterministic=True)
    ref = embedding_reference(ids, weight, 30, lid, lang_weight, scale=2.0)
    assert_close(out, ref, 1e-6, 1e-6, "shard")
    out.sum().backward()
    assert weight.grad is not None and lang_weight.grad is not None
    assert fused_unit_embedding(ids, weight, 30).shape == (2, 13, 24)  # language table optional at call time
    assert use_triton(ids)
    assert_close(fused_unit_embedding(ids, weight, 30, force="reference"),
                 fused_unit_embedding(ids, weight, 30), 1e-6, 1e-6, "force")
    with pytest.raises(ValueError):
        fused_unit_embedding(ids, weight, 30, force="bogus")
    with pytest.raises(ValueError):
        fused_unit_embedding(ids, weight, 30, lang_ids=lid)


def test_empty_ids(device):
    w = torch.randn(5, 8, device=device, requires_grad=True)
    out = fused_unit_embedding(torch.zeros(0, 3, dtype=torch.long, device=device), w, 0, force="triton")
    assert out.shape == (0, 3, 8)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_low_precision(dtype, deterministic):
    gen = torch.Generator().manual_seed(5)
    V, H, L, vs = 1024, 2048, 4, 1024
    ids = _edge_ids((8, 1000), vs, V, gen, "cuda")
    lid = torch.randint(0, L, ids.shape, generator=gen).cuda()
    w = (torch.randn(V, H, generator=gen) * 0.02).to("cuda", dtype)
    lw = (torch.randn(L, H, generator=gen) * 0.02).to("cuda", dtype)
    go = (torch.randn(8, 1000, H, generator=gen) * 0.01).to("cuda", dtype)
    a = _grads(fused_unit_embedding, ids, w, lid, lw, go, vocab_start=vs, scale=1.5, deterministic=deterministic)
    b = _grads(embedding_reference, ids, w, lid, lw, go, vocab_start=vs, scale=1.5)
    assert a[0].dtype == dtype
    assert_close(a[0], b[0], 1e-2, 1e-2, "out")
    assert_close(a[1], b[1], 2e-2, 2e-2, "grad weight")
    assert_close(a[2], b[2], 5e-2, 2e-2, "grad lang")
