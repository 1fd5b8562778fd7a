"""Fused unit embedding for a tensor-parallel vocabulary shard.

``out[t] = (weight[ids[t] - vocab_start] if vocab_start <= ids[t] < vocab_start + V_shard else 0) * scale
          + (lang_weight[lang_ids[t]] if add_lang and lang_ids[t] >= 0 else 0)``

One Triton pass replaces megatron-core's mask / subtract / gather / zero sequence
(and the separate language-embedding add).  Math runs in fp32 and the result is cast
to ``weight.dtype``.

Backward (gradients for ``weight`` and ``lang_weight``, never for the ids):

* ``deterministic=True``: the shard-local ids are stably sorted (``torch.sort``, out-of-shard
  tokens get the sentinel key ``V_shard`` and sort last) and ``torch.searchsorted`` turns the
  sorted keys into per-row ``[start, end)`` offsets -- no host sync, fixed sizes.  One program
  per (vocabulary row, hidden block) walks its run of tokens in sorted order, summing tiles of
  gathered gradient rows in fp32, and writes the row exactly once (rows that no token hit are
  written as zeros, so no separate memset).  Same inputs give bit-identical gradients.
* ``deterministic=False``: one pass over token chunks that ``atomic_add``s each gradient row into an
  fp32 buffer (cast to ``weight.dtype`` at the end).  Fast, order of additions not fixed.
* The language table (small, hit by nearly every token) never goes through atomics: a token-chunk
  kernel writes per-chunk, per-language fp32 partial sums and ``torch.sum`` over chunks
  reduces them (deterministic in both modes).  In non-deterministic mode the same token pass does
  both the weight atomics and the language partials.

Tensor parallelism and the language table: the language rows must be added on exactly one TP rank
(``add_lang=True`` there, ``False`` elsewhere), otherwise the all-reduce counts them TP times.  By
plain autograd only that rank then gets a language-table gradient.  Since the gradient reaching
every rank through megatron's all-reduce is identical, ``lang_grad_all_ranks=True`` makes the
non-adding ranks compute the same (correct) language-table gradient too, keeping the replicated
table in sync without an extra all-reduce.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, resolve

__all__ = [
    "fused_unit_embedding",
    "embedding_reference",
    "FusedUnitEmbeddingFunction",
]

_MAX_FUSED_LANGS = 16  # above this the language gradient falls back to torch (index_add_)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _embed_fwd_kernel(
    ids_ptr, w_ptr, lang_ids_ptr, lw_ptr, out_ptr,
    N, H, vocab_start, V, L, scale,
    stride_w, stride_lw, stride_out,
    HAS_LANG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < N
    h_mask = offs_h < H

    ids = tl.load(ids_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    local = ids - vocab_start
    valid = (local >= 0) & (local < V) & t_mask
    local = tl.where(valid, local, 0)
    rows = tl.load(
        w_ptr + local[:, None] * stride_w + offs_h[None, :],
        mask=valid[:, None] & h_mask[None, :], other=0.0,
    ).to(tl.float32)
    acc = rows * scale
    if HAS_LANG:
        lid = tl.load(lang_ids_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)
        l_valid = (lid >= 0) & (lid < L) & t_mask
        lid = tl.where(l_valid, lid, 0)
        lrows = tl.load(
            lw_ptr + lid[:, None] * stride_lw + offs_h[None, :],
            mask=l_valid[:, None] & h_mask[None, :], other=0.0,
        ).to(tl.float32)
        acc += lrows
    tl.store(
        out_ptr + offs_t[:, None] * stride_out + offs_h[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=t_mask[:, None] & h_mask[None, :],
    )


@triton.jit
def _embed_bwd_rows_kernel(
    g_ptr, perm_ptr, offsets_ptr, gw_ptr,
    H, scale, stride_g, stride_gw,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic segment reduction: one program per (vocabulary row, hidden block)."""
    row = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for s in range(start, end, BLOCK_T):
        idx = s + tl.arange(0, BLOCK_T)
        m = idx < end
        tok = tl.load(perm_ptr + idx, mask=m, other=0).to(tl.int64)
        g = tl.load(
            g_ptr + tok[:, None] * stride_g + offs_h[None, :],
            mask=m[:, None] & h_mask[None, :], other=0.0,
        )
        acc += g.to(tl.float32)
    total = tl.sum(acc, axis=0) * scale
    tl.store(gw_ptr + row.to(tl.int64) * stride_gw + offs_h, total.to(gw_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _embed_bwd_tokens_kernel(
    g_ptr, ids_ptr, lang_ids_ptr, gw32_ptr, lpart_ptr,
    N, H, vocab_start, V, scale,
    stride_g, stride_gw,
    DO_WEIGHT: tl.constexpr, DO_LANG: tl.constexpr, NUM_LANG: tl.constexpr, L_POW2: tl.constexpr,
    ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Token-chunk pass: weight-gradient atomics and/or per-chunk language partial sums."""
    pid_c = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    l_range = tl.arange(0, L_POW2)
    lacc = tl.zeros([L_POW2, BLOCK_H], dtype=tl.float32)
    base = pid_c.to(tl.int64) * (ITERS * BLOCK_T)
    for it in range(ITERS):
        offs_t = base + it * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < N
        g = tl.load(
            g_ptr + offs_t[:, None] * stride_g + offs_h[None, :],
            mask=t_mask[:, None] & h_mask[None, :], other=0.0,
        ).to(tl.float32)
        if DO_WEIGHT:
            ids = tl.load(ids_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
            local = ids - vocab_start
            valid = (local >= 0) & (local < V) & t_mask
            local = tl.where(valid, local, 0)
            tl.atomic_add(
                gw32_ptr + local[:, None] * stride_gw + offs_h[None, :],
                g * scale,
                mask=valid[:, None] & h_mask[None, :],
            )
        if DO_LANG:
            lid = tl.load(lang_ids_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
            for lang in tl.static_range(NUM_LANG):
                s = tl.sum(tl.where((lid == lang)[:, None], g, 0.0), axis=0)
                lacc = tl.where((l_range == lang)[:, None], lacc + s[None, :], lacc)
    if DO_LANG:
        # partial buffer: [num_chunks, NUM_LANG, H] fp32, contiguous
        ptrs = lpart_ptr + (pid_c.to(tl.int64) * NUM_LANG + l_range[:, None]) * H + offs_h[None, :]
        tl.store(ptrs, lacc, mask=(l_range < NUM_LANG)[:, None] & h_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _fwd_config(H: int):
    if interpreting():
        return triton.next_power_of_2(H), 64, 4  # BLOCK_H, BLOCK_T, num_warps (few big programs)
    block_h = min(triton.next_power_of_2(H), 1024)
    block_t = max(1, 8192 // block_h)
    return block_h, block_t, 4


def _bwd_config(H: int):
    if interpreting():
        return triton.next_power_of_2(H), 64, 4
    block_h = min(triton.next_power_of_2(H), 256)
    return block_h, 16, 4


def _embedding_forward(ids, weight, vocab_start, lang_ids, lang_weight, scale, add_lang):
    V, H = weight.shape
    flat_ids = ids.reshape(-1).contiguous()
    N = flat_ids.numel()
    out = torch.empty((N, H), dtype=weight.dtype, device=weight.device)
    if N == 0:
        return out.reshape(*ids.shape, H)
    has_lang = bool(add_lang and lang_weight is not None and lang_ids is not None)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    if has_lang:
        lw = lang_weight if lang_weight.stride(1) == 1 else lang_weight.contiguous()
        flat_lang = lang_ids.reshape(-1).contiguous()
        L, stride_lw = lw.shape[0], lw.stride(0)
    else:
        lw, flat_lang, L, stride_lw = w, flat_ids, 0, 0
    block_h, block_t, warps = _fwd_config(H)
    grid = (triton.cdiv(N, block_t), triton.cdiv(H, block_h))
    _embed_fwd_kernel[grid](
        flat_ids, w, flat_lang, lw, out,
        N, H, int(vocab_start), V, L, float(scale),
        w.stride(0), stride_lw, out.stride(0),
        HAS_LANG=has_lang, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
    )
    return out.reshape(*ids.shape, H)


def _lang_grad_torch(g, flat_lang, L, dtype):
    valid = flat_lang >= 0
    acc = torch.zeros((L, g.shape[1]), dtype=torch.float32, device=g.device)
    acc.index_add_(0, flat_lang[valid].long(), g[valid].float())
    return acc.to(dtype)


def _embedding_backward(grad_out, flat_ids, weight_shape, weight_dtype, vocab_start, flat_lang,
                        lang_shape, lang_dtype, scale, want_weight, want_lang, deterministic):
    V, H = weight_shape
    g = grad_out.reshape(-1, H)
    if g.stride(1) != 1:
        g = g.contiguous()
    N = g.shape[0]
    device = g.device
    grad_w = grad_l = None
    block_h, block_t, warps = _bwd_config(H)
    n_hblocks = triton.cdiv(H, block_h)
    L = lang_shape[0] if want_lang else 0
    lang_in_kernel = want_lang and L <= _MAX_FUSED_LANGS and N > 0
    if want_lang and not lang_in_kernel:
        grad_l = _lang_grad_torch(g, flat_lang, L, lang_dtype) if N > 0 else torch.zeros(lang_shape, dtype=lang_dtype, device=device)
    if want_lang and N == 0:
        grad_l = torch.zeros(lang_shape, dtype=lang_dtype, device=device)

    if want_weight and deterministic:
        grad_w = torch.empty((V, H), dtype=weight_dtype, device=device)
        local = flat_ids.to(torch.int64) - int(vocab_start)
        key = torch.where((local >= 0) & (local < V), local, torch.full_like(local, V))
        sorted_key, perm = torch.sort(key, stable=True)
        offsets = torch.searchsorted(sorted_key, torch.arange(V + 1, device=device, dtype=torch.int64))
        _embed_bwd_rows_kernel[(V, n_hblocks)](
            g, perm, offsets, grad_w, H, float(scale), g.stride(0), grad_w.stride(0),
            BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
        )

    do_atomic = want_weight and not deterministic and N > 0
    if want_weight and not deterministic and N == 0:
        grad_w = torch.zeros((V, H), dtype=weight_dtype, device=device)
    if do_atomic or lang_in_kernel:
        iters = min(64, triton.cdiv(N, block_t)) if interpreting() else 64
        chunk = iters * block_t
        n_chunks = triton.cdiv(N, chunk)
        gw32 = torch.zeros((V, H), dtype=torch.float32, device=device) if do_atomic else g
        num_lang = L if lang_in_kernel else 1
        lpart = (torch.empty((n_chunks, num_lang, H), dtype=torch.float32, device=device)
                 if lang_in_kernel else g)
        _embed_bwd_tokens_kernel[(n_chunks, n_hblocks)](
            g, flat_ids, flat_lang if lang_in_kernel else flat_ids, gw32, lpart,
            N, H, int(vocab_start), V, float(scale),
            g.stride(0), H,
            DO_WEIGHT=do_atomic, DO_LANG=lang_in_kernel, NUM_LANG=num_lang,
            L_POW2=triton.next_power_of_2(num_lang),
            ITERS=iters, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
        )
        if do_atomic:
            grad_w = gw32 if weight_dtype == torch.float32 else gw32.to(weight_dtype)
        if lang_in_kernel:
            grad_l = lpart.sum(0).to(lang_dtype)
    return grad_w, grad_l


class FusedUnitEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, lang_ids, lang_weight, vocab_start, scale, deterministic, add_lang,
                lang_grad_all_ranks):
        out = _embedding_forward(ids, weight, vocab_start, lang_ids, lang_weight, scale, add_lang)
        has_lang_table = lang_weight is not None and lang_ids is not None
        ctx.lang_grad = has_lang_table and (add_lang or lang_grad_all_ranks)
        ctx.vocab_start = int(vocab_start)
        ctx.scale = float(scale)
        ctx.deterministic = bool(deterministic)
        ctx.weight_meta = (tuple(weight.shape), weight.dtype)
        ctx.lang_meta = (tuple(lang_weight.shape), lang_weight.dtype) if lang_weight is not None else None
        flat_lang = lang_ids.reshape(-1).contiguous() if ctx.lang_grad else None
        ctx.save_for_backward(ids.reshape(-1).contiguous(), flat_lang)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat_ids, flat_lang = ctx.saved_tensors
        want_weight = ctx.needs_input_grad[1]
        want_lang = ctx.lang_grad and ctx.needs_input_grad[3]
        if not (want_weight or want_lang):
            return (None,) * 9
        w_shape, w_dtype = ctx.weight_meta
        l_shape, l_dtype = ctx.lang_meta if ctx.lang_meta is not None else ((0, 0), None)
        grad_w, grad_l = _embedding_backward(
            grad_out, flat_ids, w_shape, w_dtype, ctx.vocab_start, flat_lang, l_shape, l_dtype,
            ctx.scale, want_weight, want_lang, ctx.deterministic,
        )
        return None, grad_w, None, grad_l, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _check(ids, weight, lang_ids, lang_weight):
    if ids.dtype.is_floating_point:
        raise TypeError("ids must be an integer tensor")
    if weight.dim() != 2:
        raise ValueError("weight must be [V_shard, H]")
    if (lang_ids is None) != (lang_weight is None):
        raise ValueError("lang_ids and lang_weight must be given together")
    if lang_weight is not None:
        if lang_weight.dim() != 2 or lang_weight.shape[1] != weight.shape[1]:
            raise ValueError("lang_weight must be [L, H] with the same H as weight")
        if lang_ids.shape != ids.shape:
            raise ValueError("lang_ids must have the shape of ids")
        if lang_ids.dtype.is_floating_point:
            raise TypeError("lang_ids must be an integer tensor")


def embedding_reference(ids, weight, vocab_start: int, lang_ids=None, lang_weight=None, scale: float = 1.0,
                        deterministic: bool = False, add_lang: bool = True, lang_grad_all_ranks: bool = False,
                        force: Optional[str] = None):
    """Plain-torch reference (fp32 math, output in ``weight.dtype``); same signature as the fused op.

    ``deterministic`` and ``force`` are accepted for signature compatibility and ignored.
    """
    _check(ids, weight, lang_ids, lang_weight)
    V = weight.shape[0]
    local = ids.long() - int(vocab_start)
    valid = (local >= 0) & (local < V)
    rows = weight.float()[torch.where(valid, local, torch.zeros_like(local))]
    out = rows * valid.unsqueeze(-1).to(rows.dtype) * float(scale)
    if lang_weight is not None and (add_lang or lang_grad_all_ranks):
        lid = lang_ids.long()
        lvalid = lid >= 0
        lrows = lang_weight.float()[torch.where(lvalid, lid, torch.zeros_like(lid))]
        lrows = lrows * lvalid.unsqueeze(-1).to(lrows.dtype)
        # value only where added; gradient also on the non-adding ranks if asked to
        out = out + (lrows if add_lang else lrows - lrows.detach())
    return out.to(weight.dtype)


def fused_unit_embedding(ids, weight, vocab_start: int = 0, lang_ids=None, lang_weight=None, scale: float = 1.0,
                         deterministic: bool = False, add_lang: bool = True, lang_grad_all_ranks: bool = False,
                         force: Optional[str] = None):
    """Embedding lookup over this rank's vocabulary shard (see module docstring).

    ids: integer tensor of any shape; weight: [V_shard, H]; lang_ids: same shape as ids (negative ids
    add nothing); lang_weight: [L, H].  Returns ``ids.shape + (H,)`` in ``weight.dtype``.
    """
    _check(ids, weight, lang_ids, lang_weight)
    if not resolve(force, weight):
        return embedding_reference(ids, weight, vocab_start, lang_ids, lang_weight, scale,
                                   deterministic, add_lang, lang_grad_all_ranks)
    return FusedUnitEmbeddingFunction.apply(ids, weight, lang_ids, lang_weight, int(vocab_start), float(scale),
                                            bool(deterministic), bool(add_lang), bool(lang_grad_all_ranks))

