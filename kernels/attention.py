"""Flash-style causal attention restricted to segments (documents) of packed sequences.

``segment_attention(q, k, v, segment_ids)``: query ``i`` attends key ``j`` iff ``j <= i`` and
``segment_ids[b, i] == segment_ids[b, j]``.  q is ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` with
``Hq % Hkv == 0`` (grouped-query attention), any strides with a unit last-dim stride (so megatron's
``[S, B, H, D]`` tensors can be passed as ``.transpose(0, 1)`` views without a copy).

No ``S x S`` mask is ever built.  **Block table** (:func:`block_table`, the analogue of FlexAttention's
BlockMask): from the segment ids, per block of positions, the min and max segment id; a (query block,
key block) pair can hold an allowed pair only if the two [min, max] ranges intersect and the key block
starts at or before the query block's last row.  A pair is *full* when both blocks carry one and the
same segment, lie inside the sequence and every key precedes every query (no mask needed).  Per query
block the table stores the visiting range ``[lo, hi)`` of key blocks and inside it the range
``[flo, fhi)`` of full blocks (empty unless the full blocks are contiguous), and the same per key
block over query blocks for the dk/dv kernel.  The table depends only on the segment ids and the block
sizes, so it is built ONCE per batch and cached on the segment-id tensor (every layer of a model gets
the same tensor; an in-place change bumps the tensor's version and rebuilds it).

Every kernel runs three plain loops -- masked blocks ``[lo, flo)``, full blocks ``[flo, fhi)``,
masked blocks ``[fhi, hi)`` -- with the K/V loads unconditional in the loop body, so Triton's software
pipeliner prefetches them (``num_stages``).  The mask is equality plus causality, applied inside the
masked loops; the ranges only prune (non-monotone segment ids stay correct: they just get no full
range and wider masked ranges).

Forward: online softmax in the log2 domain, fp32 accumulators, stores O and the row log-sum-exp.
Backward, FA2-style: ``delta = rowsum(dO * O)`` in a small preprocess kernel, then one program per
(key block, kv head) loops over the query heads of its GQA group and the query blocks that can see
it, accumulating dk and dv in registers.  Default (``deterministic=False``): the same pass also
computes ``dq += dS k`` and ``atomic_add``s it into an fp32 buffer -- 5 matmuls per block pair, like
FA2.  ``deterministic=True``: no atomics; a separate dq kernel (one program per query block and head)
recomputes P and dP -- 7 matmuls, bit-identical across runs.

Block sizes: the launchers autotune over the per-architecture space of
:func:`kernels.dispatch.attention_space` on first use of a shape class and cache the choice
(in-process and in a JSON file, see :mod:`kernels.autotune`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import autotune
from .dispatch import attention_space, interpreting, resolve

__all__ = ["segment_attention", "segment_attention_reference", "SegmentAttentionFunction", "block_table",
           "BlockTable"]

_LOG2E = 1.4426950408889634
# Score of a masked pair.  A finite value (not -inf) so a row whose every key in a block is masked
# gives exp2(0) terms that the next real block's rescale (alpha = exp2(-1e30 - m) = 0) wipes, never NaN.
# A tl.constexpr: compiled @triton.jit code may only read constexpr globals (a plain float global
# compiles under the interpreter but fails for a GPU with "Cannot access global variable _NEG").
_NEG = tl.constexpr(-1.0e30)

# Block sizes; tests may override (e.g. small blocks to exercise block boundaries under the interpreter).
_CONFIG_OVERRIDE: dict = {}
_INTERPRET_CFG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------------------------
# block table (once per batch)
# ----------------------------------------------------------------------------------------------
class BlockTable(NamedTuple):
    """Visiting ranges for one (BLOCK_M, BLOCK_N) pair; int32 tensors on the segment ids' device."""
    block_m: int
    block_n: int
    nbq: int
    nbk: int
    kv: torch.Tensor  # [B, nbq, 4]: lo, flo, fhi, hi over key blocks, per query block
    q: torch.Tensor   # [B, nbk, 4]: lo, flo, fhi, hi over query blocks, per key block


def _block_minmax(seg: torch.Tensor, block: int):
    B, S = seg.shape
    nb = triton.cdiv(S, block)
    pad = nb * block - S
    if pad:
        seg = torch.cat([seg, seg[:, -1:].expand(B, pad)], dim=1)
    v = seg.reshape(B, nb, block)
    return v.amin(-1), v.amax(-1)


def _ranges(ov: torch.Tensor, full: torch.Tensor, dim: int) -> torch.Tensor:
    """[lo, flo, fhi, hi] along ``dim`` of the overlap / full tables (other dims kept)."""
    n = ov.shape[dim]
    idx = torch.arange(n, device=ov.device).view([-1 if d == dim else 1 for d in range(ov.dim())])
    big = torch.full_like(idx, n).expand_as(ov)
    lo = torch.where(ov, idx, big).amin(dim)
    hi = torch.where(ov, idx, -1).amax(dim) + 1
    f_first = torch.where(full, idx, big).amin(dim)
    f_last = torch.where(full, idx, -1).amax(dim)
    contiguous = (full.sum(dim) == f_last - f_first + 1) & (f_last >= 0)
    flo = torch.where(contiguous, f_first, hi)
    fhi = torch.where(contiguous, f_last + 1, hi)
    return torch.stack([lo, flo, fhi, hi], dim=-1).to(torch.int32).contiguous()


def _build_table(seg: torch.Tensor, block_m: int, block_n: int) -> BlockTable:
    B, S = seg.shape
    qmin, qmax = _block_minmax(seg, block_m)
    kmin, kmax = _block_minmax(seg, block_n)
    nbq, nbk = qmin.shape[1], kmin.shape[1]
    dev = seg.device
    m_first = torch.arange(nbq, device=dev) * block_m
    n_first = torch.arange(nbk, device=dev) * block_n
    causal = n_first[None, :] <= (m_first + block_m - 1)[:, None]          # [nbq, nbk]
    below = (n_first + block_n - 1)[None, :] <= m_first[:, None]             # every key <= every query
    inside = ((m_first + block_m) <= S)[:, None] & ((n_first + block_n) <= S)[None, :]
    ov = (kmax[:, None, :] >= qmin[:, :, None]) & (kmin[:, None, :] <= qmax[:, :, None]) & causal[None]
    uni_q = (qmin == qmax)[:, :, None]
    uni_k = (kmin == kmax)[:, None, :]
    full = ov & uni_q & uni_k & (qmin[:, :, None] == kmin[:, None, :]) & (below & inside)[None]
    return BlockTable(block_m, block_n, nbq, nbk, _ranges(ov, full, 2), _ranges(ov, full, 1))


def _cache_of(segment_ids: torch.Tensor) -> dict:
    """Per-tensor cache dict (attribute ``_segattn_tables``), reset when the tensor's version changes."""
    cache = getattr(segment_ids, "_segattn_tables", None)
    if cache is None or cache.get("version") != segment_ids._version:
        cache = {"version": segment_ids._version}
        try:
            segment_ids._segattn_tables = cache
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass that refuses attributes: no sharing
            pass
    return cache


def block_table(segment_ids: torch.Tensor, block_m: int, block_n: int) -> BlockTable:
    """The block table of ``segment_ids`` for ``(block_m, block_n)``, built once and cached on the tensor.

    Keyed by block sizes and invalidated by the tensor's version counter, so all layers of a step (which
    receive the same segment-id tensor) share one build.
    """
    cache = _cache_of(segment_ids)
    key = (block_m, block_n)
    if key not in cache:
        cache[key] = _build_table(segment_ids, block_m, block_n)
    return cache[key]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, offs_r, stride, offs_d, r_in, D: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows ``offs_r`` of a [rows, D] tile; without ``CHECK_ROWS`` every row is known to be inside."""
    ptrs = base + offs_r[:, None] * stride + offs_d[None, :]
    if not CHECK_ROWS:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=r_in[:, None] & (offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S, sks, svs,
               qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_in = offs_n < S
    k = _load_rows(k_base, offs_n, sks, offs_d, n_in, D, BLOCK_D, MASKED)
    v = _load_rows(v_base, offs_n, svs, offs_d, n_in, D, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        seg_k = tl.load(seg_base + offs_n, mask=n_in, other=-2)
        allowed = (seg_q[:, None] == seg_k[None, :]) & (offs_m[:, None] >= offs_n[None, :]) & n_in[None, :]
        qk = tl.where(allowed, qk, _NEG)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


# head counts are not specialised (Hkv == 1, GROUP == 1 would each make another compiled variant)
@triton.jit(do_not_specialize=["Hq", "GROUP"])
def _attn_fwd_kernel(
    Q, K, V, SEG, O, LSE, KV_RANGE,
    qk_scale, S, Hq, GROUP, NBQ,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, ssb,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = NBQ - 1 - tl.program_id(0)  # longest rows (most key blocks) first: shorter tail
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < S
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    seg_base = SEG + b * ssb
    q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=m_in[:, None] & (offs_d < D)[None, :],
                other=0.0)
    seg_q = tl.load(seg_base + offs_m, mask=m_in, other=-1)
    rng = KV_RANGE + (b * NBQ + pid_m) * 4
    lo = tl.load(rng)
    flo = tl.load(rng + 1)
    fhi = tl.load(rng + 2)
    hi = tl.load(rng + 3)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for blk in range(lo, flo):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base,
                                   blk * BLOCK_N, S, sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, True, PREC)
    for blk in range(flo, fhi):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base,
                                   blk * BLOCK_N, S, sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, False, PREC)
    for blk in range(fhi, hi):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base,
                                   blk * BLOCK_N, S, sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, True, PREC)
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    o_base = O + b * sob + h * soh
    tl.store(o_base + offs_m[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_in[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + (b * Hq + h) * S + offs_m, lse, mask=m_in)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
_DELTA_BLOCK = 64


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, S, Hq, sob, sos, soh, sdb, sds, sdh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + (b * Hq + h) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base, seg_base, dq_base,
                start_m, S, sqs, sds, sdqs, qk_scale, sm_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_in = offs_m < S
    ld_mask = m_in[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sds + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(lse_base + offs_m, mask=m_in, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=m_in, other=0.0)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    pT = tl.math.exp2(qkT - lse[None, :])
    if MASKED:
        seg_q = tl.load(seg_base + offs_m, mask=m_in, other=-1)
        allowed = (seg_k[:, None] == seg_q[None, :]) & (offs_m[None, :] >= offs_n[:, None]) & m_in[None, :]
        pT = tl.where(allowed, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    if ATOMIC_DQ:  # the 5th matmul: this key block's share of dq, summed across key blocks by atomics
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale
        tl.atomic_add(dq_base + offs_m[:, None] * sdqs + offs_d[None, :], dq, mask=ld_mask, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["Hq", "Hkv", "GROUP"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DK, DV, DQ, Q_RANGE,
    qk_scale, sm_scale, S, Hq, Hkv, GROUP, NBK,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, ssb,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh, sdqb, sdqs, sdqh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < S
    ld_mask = n_in[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=ld_mask, other=0.0)
    seg_base = SEG + b * ssb
    seg_k = tl.load(seg_base + offs_n, mask=n_in, other=-2)
    rng = Q_RANGE + (b * NBK + pid_n) * 4
    lo = tl.load(rng)
    flo = tl.load(rng + 1)
    fhi = tl.load(rng + 2)
    hi = tl.load(rng + 3)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        dq_base = DQ + b * sdqb + h * sdqh
        lse_base = LSE + (b * Hq + h) * S
        delta_base = DELTA + (b * Hq + h) * S
        for blk in range(lo, flo):
            dk, dv = _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                 seg_base, dq_base, blk * BLOCK_M, S, sqs, sds, sdqs, qk_scale, sm_scale, D,
                                 BLOCK_M, True, ATOMIC_DQ, PREC)
        for blk in range(flo, fhi):
            dk, dv = _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                 seg_base, dq_base, blk * BLOCK_M, S, sqs, sds, sdqs, qk_scale, sm_scale, D,
                                 BLOCK_M, False, ATOMIC_DQ, PREC)
        for blk in range(fhi, hi):
            dk, dv = _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                 seg_base, dq_base, blk * BLOCK_M, S, sqs, sds, sdqs, qk_scale, sm_scale, D,
                                 BLOCK_M, True, ATOMIC_DQ, PREC)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=ld_mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=ld_mask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S, sks, svs,
              qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_in = offs_n < S
    k = _load_rows(k_base, offs_n, sks, offs_d, n_in, D, BLOCK_D, MASKED)
    v = _load_rows(v_base, offs_n, svs, offs_d, n_in, D, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        seg_k = tl.load(seg_base + offs_n, mask=n_in, other=-2)
        allowed = (seg_q[:, None] == seg_k[None, :]) & (offs_m[:, None] >= offs_n[None, :]) & n_in[None, :]
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["Hq", "GROUP"])
def _attn_bwd_dq_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DQ, KV_RANGE,
    qk_scale, sm_scale, S, Hq, GROUP, NBQ,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, ssb, sdqb, sdqs, sdqh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = NBQ - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < S
    ld_mask = m_in[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(LSE + (b * Hq + h) * S + offs_m, mask=m_in, other=0.0)
    delta = tl.load(DELTA + (b * Hq + h) * S + offs_m, mask=m_in, other=0.0)
    seg_base = SEG + b * ssb
    seg_q = tl.load(seg_base + offs_m, mask=m_in, other=-1)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    rng = KV_RANGE + (b * NBQ + pid_m) * 4
    lo = tl.load(rng)
    flo = tl.load(rng + 1)
    fhi = tl.load(rng + 2)
    hi = tl.load(rng + 3)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for blk in range(lo, flo):
        dq = _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, blk * BLOCK_N, S,
                       sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, True, PREC)
    for blk in range(flo, fhi):
        dq = _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, blk * BLOCK_N, S,
                       sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, False, PREC)
    for blk in range(fhi, hi):
        dq = _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, blk * BLOCK_N, S,
                       sks, svs, qk_scale, D, BLOCK_D, BLOCK_N, True, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=ld_mask)


# ----------------------------------------------------------------------------------------------
# launchers + autograd
# ----------------------------------------------------------------------------------------------
def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _override(cfg: dict, kind: str) -> dict:
    out = dict(cfg)
    for src, dst in (("_m", "BLOCK_M"), ("_n", "BLOCK_N")):
        if kind + src in _CONFIG_OVERRIDE:
            out[dst] = _CONFIG_OVERRIDE[kind + src]
    return out


def _candidates(kind: str, D: int, dtype: torch.dtype, device, deterministic: bool = False) -> list:
    """The configs the launcher may use here: the interpreter's one, or the arch's autotune space."""
    if interpreting() or device.type != "cuda":
        return [_override(dict(_INTERPRET_CFG, ATOMIC_DQ=not deterministic), kind)]
    from .dispatch import arch_of
    space = attention_space(kind, arch_of(device), D, dtype, deterministic)
    if _CONFIG_OVERRIDE:
        return [_override(space[0], kind)]
    return space


def _tune_key(kind, q, k) -> str:
    B, S, Hq, D = q.shape
    dev = torch.cuda.get_device_name(q.device)
    grp = "mha" if Hq == k.shape[2] else "gqa"
    return f"segattn-{kind}|{dev}|triton{triton.__version__}|D{D}|" \
           f"{str(q.dtype).replace('torch.', '')}|{grp}|S{triton.next_power_of_2(S)}"


def _launch_forward(q, k, v, seg, seg_src, sm_scale, cfg, o, lse):
    B, S, Hq, D = q.shape
    tab = block_table(seg_src, cfg["BLOCK_M"], cfg["BLOCK_N"])
    _attn_fwd_kernel[(tab.nbq, B * Hq)](
        q, k, v, seg, o, lse, tab.kv,
        sm_scale * _LOG2E, S, Hq, Hq // k.shape[2], tab.nbq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), seg.stride(0),
        D=D, BLOCK_D=_block_d(D), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _attn_forward(q, k, v, seg, sm_scale, seg_src=None, config=None):
    """O [B,S,Hq,D] and LSE [B,Hq,S] (log2 domain).  ``config``: fixed block sizes (else tuned/default)."""
    B, S, Hq, D = q.shape
    seg_src = seg if seg_src is None else seg_src
    o = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    if config is None:
        cands = _candidates("fwd", D, q.dtype, q.device)
        config = cands[0] if len(cands) == 1 else autotune.choose(
            _tune_key("fwd", q, k), cands, lambda c: autotune.do_bench_ms(
                lambda: _launch_forward(q, k, v, seg, seg_src, sm_scale, c, o, lse)))
    _launch_forward(q, k, v, seg, seg_src, sm_scale, config, o, lse)
    return o, lse


def _launch_backward(do, q, k, v, seg, seg_src, o, lse, sm_scale, cfg):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    block_d = _block_d(D)
    prec = _prec(q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    split = not cfg["ATOMIC_DQ"]
    delta = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(S, _DELTA_BLOCK), B * Hq)](
        o, do, delta, S, Hq, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK,
    )
    tab = block_table(seg_src, bm, bn)
    dk = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, S, Hkv, D), dtype=v.dtype, device=v.device)
    if split:
        dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    else:  # fp32 accumulator for the atomics (the dk/dv pass adds every key block's share)
        dq = torch.zeros((B, S, Hq, D), dtype=torch.float32, device=q.device)
    qk_scale = sm_scale * _LOG2E
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), seg.stride(0))
    _attn_bwd_dkdv_kernel[(tab.nbk, B * Hkv)](
        q, k, v, seg, do, lse, delta, dk, dv, dq, tab.q,
        qk_scale, sm_scale, S, Hq, Hkv, group, tab.nbk, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec, ATOMIC_DQ=not split,
        num_warps=warps, num_stages=stages,
    )
    if split:
        _attn_bwd_dq_kernel[(tab.nbq, B * Hq)](
            q, k, v, seg, do, lse, delta, dq, tab.kv,
            qk_scale, sm_scale, S, Hq, group, tab.nbq, *common, dq.stride(0), dq.stride(1), dq.stride(2),
            D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
    elif dq.dtype != q.dtype:
        dq = dq.to(q.dtype)
    return dq, dk, dv


def _attn_backward(do, q, k, v, seg, o, lse, sm_scale, deterministic=False, seg_src=None, config=None):
    """(dq, dk, dv).  ``deterministic``: no atomics (separate dq kernel), default block sizes, same bits.

    ``config``: fixed block sizes and ATOMIC_DQ (else the tuned / default one)."""
    D = q.shape[-1]
    seg_src = seg if seg_src is None else seg_src
    do = _unit_last(do)
    if config is None:
        cands = _candidates("bwd", D, q.dtype, q.device, deterministic)
        config = cands[0] if len(cands) == 1 else autotune.choose(
            _tune_key("bwd", q, k), cands, lambda c: autotune.do_bench_ms(
                lambda: _launch_backward(do, q, k, v, seg, seg_src, o, lse, sm_scale, c)))
    elif deterministic and config.get("ATOMIC_DQ", True):
        raise ValueError("deterministic=True needs a config with ATOMIC_DQ=False")
    return _launch_backward(do, q, k, v, seg, seg_src, o, lse, sm_scale, config)


class SegmentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, seg_src, sm_scale, deterministic):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _attn_forward(q, k, v, seg, sm_scale, seg_src=seg_src)
        ctx.save_for_backward(q, k, v, seg, o, lse)
        ctx.seg_src = seg_src  # the caller's tensor: the cached block tables live on it
        ctx.sm_scale = sm_scale
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, seg, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, seg, o, lse, ctx.sm_scale, ctx.deterministic,
                                    seg_src=ctx.seg_src)
        return dq, dk, dv, None, None, None, None


def _check(q, k, v, segment_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, S, H, D]")
    B, S, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} incompatible with q {tuple(q.shape)}")
    if Hq % k.shape[2] != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={k.shape[2]}")
    if segment_ids.shape != (B, S):
        raise ValueError(f"segment_ids must be [B, S] = {(B, S)}, got {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point:
        raise TypeError("segment_ids must be an integer tensor")


def segment_attention_reference(q, k, v, segment_ids, softmax_scale: Optional[float] = None,
                                force: Optional[str] = None, deterministic: Optional[bool] = None):
    """Plain torch: dense [B, S, S] mask, fp32 math, output in q.dtype.  Differentiable."""
    _check(q, k, v, segment_ids)
    B, S, Hq, D = q.shape
    rep = Hq // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(rep, dim=2).transpose(1, 2)
    seg = segment_ids
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, vf).transpose(1, 2)
    return out.to(q.dtype)


def _int32_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 contiguous segment ids for the kernels, converted once per tensor (cached like the tables)."""
    if segment_ids.dtype == torch.int32 and segment_ids.is_contiguous():
        return segment_ids
    cache = _cache_of(segment_ids)
    if "int32" not in cache:
        cache["int32"] = segment_ids.to(torch.int32).contiguous()
    return cache["int32"]


def segment_attention(q, k, v, segment_ids, softmax_scale: Optional[float] = None, force: Optional[str] = None,
                      deterministic: Optional[bool] = None):
    """Causal attention within segments; q [B,S,Hq,D], k/v [B,S,Hkv,D], segment_ids [B,S] -> [B,S,Hq,D].

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): backward without
    atomics and with fixed block sizes, bit-identical across runs.
    """
    _check(q, k, v, segment_ids)
    if not resolve(force, q):
        return segment_attention_reference(q, k, v, segment_ids, softmax_scale)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("q, k, v must share a dtype on the Triton path")
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    det = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    seg = _int32_segments(segment_ids)
    return SegmentAttentionFunction.apply(q, k, v, seg, segment_ids, scale, det)
