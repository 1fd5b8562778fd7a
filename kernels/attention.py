"""Flash-style causal attention restricted to segments (documents) of packed sequences.

``segment_attention(q, k, v, segment_ids)``: query ``i`` attends key ``j`` iff ``j <= i`` and
``segment_ids[b, i] == segment_ids[b, j]``.  q is ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` with
``Hq % Hkv == 0`` (grouped-query attention), any strides with a unit last-dim stride (so megatron's
``[S, B, H, D]`` tensors can be passed as ``.transpose(0, 1)`` views without a copy).

No ``S x S`` mask is ever built.  Block skipping: per block of ``BLOCK`` positions the host computes
the min and max segment id (a few small torch ops, no host sync); a (query block, key block) pair can
contain an allowed pair only if the two [min, max] ranges intersect and the key block starts at or
before the query block's last row.  From the ``[B, n_qblocks, n_kblocks]`` overlap table the host
derives, per query block, the first and last key block to visit (and per key block the first and last
query block, for the dk/dv kernel); inside the loop a block whose ranges do not intersect is skipped
again (this keeps non-monotone segment layouts correct -- the mask is equality plus causality, the
ranges only prune).  A block whose queries and keys all carry the same segment and lie entirely below
the diagonal runs without any mask arithmetic.

Forward: online softmax in the log2 domain, fp32 accumulators, stores O and the row log-sum-exp.
Backward (FA2-style, no atomics, deterministic): delta = rowsum(dO * O) in a small kernel; a dk/dv
kernel with one program per (key block, kv head) that loops over the query heads of its GQA group
and over the query blocks that can see it, accumulating dk and dv in registers (so GQA needs no
atomics and no reduction afterwards); a dq kernel with one program per (query block, query head).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, resolve

__all__ = ["segment_attention", "segment_attention_reference", "SegmentAttentionFunction"]

_LOG2E = 1.4426950408889634
_NEG = -1.0e30

# Block sizes; tests may override (e.g. small blocks to exercise block boundaries under the interpreter).
_CONFIG_OVERRIDE: dict = {}


def _config(D: int, dtype: torch.dtype) -> dict:
    if interpreting():
        cfg = dict(fwd_m=32, fwd_n=32, bwd_m=32, bwd_n=32, warps_fwd=4, warps_bwd=4, stages=1)
    else:
        big = D > 64
        cfg = dict(
            fwd_m=128, fwd_n=64 if dtype != torch.float32 else 32,
            bwd_m=64 if not big else 32, bwd_n=64 if dtype != torch.float32 else 32,
            warps_fwd=4 if not big else 8, warps_bwd=4 if not big else 8, stages=3 if not big else 2,
        )
    cfg.update(_CONFIG_OVERRIDE)
    return cfg


# ----------------------------------------------------------------------------------------------
# host-side block metadata
# ----------------------------------------------------------------------------------------------
def _block_minmax(seg: torch.Tensor, block: int):
    B, S = seg.shape
    nb = triton.cdiv(S, block)
    pad = nb * block - S
    if pad:
        seg = torch.cat([seg, seg[:, -1:].expand(B, pad)], dim=1)
    v = seg.reshape(B, nb, block)
    return v.amin(-1).contiguous(), v.amax(-1).contiguous()


def _first_true(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.argmax(x.to(torch.int32), dim=dim)


def _block_ranges(seg: torch.Tensor, block_m: int, block_n: int):
    """Per-block min/max segment ids and the [lo, hi) visiting ranges of both loop orders."""
    qmin, qmax = _block_minmax(seg, block_m)
    kmin, kmax = _block_minmax(seg, block_n)
    nbq, nbk = qmin.shape[1], kmin.shape[1]
    dev = seg.device
    m_last = torch.arange(nbq, device=dev) * block_m + (block_m - 1)
    n_first = torch.arange(nbk, device=dev) * block_n
    causal = n_first[None, :] <= m_last[:, None]  # [nbq, nbk]
    ov = (kmax[:, None, :] >= qmin[:, :, None]) & (kmin[:, None, :] <= qmax[:, :, None]) & causal[None]
    kv_lo = _first_true(ov, 2)
    kv_hi = nbk - _first_true(ov.flip(2), 2)
    q_lo = _first_true(ov, 1)
    q_hi = nbq - _first_true(ov.flip(1), 1)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return (i32(qmin), i32(qmax), i32(kmin), i32(kmax), i32(kv_lo), i32(kv_hi), i32(q_lo), i32(q_hi))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S, sks, svs,
               qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_in = offs_n < S
    ld_mask = n_in[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=ld_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        seg_k = tl.load(seg_base + offs_n, mask=n_in, other=-2)
        allowed = (seg_q[:, None] == seg_k[None, :]) & (offs_m[:, None] >= offs_n[None, :]) & n_in[None, :]
        qk = tl.where(allowed, qk, _NEG)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=ld_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, SEG, O, LSE,
    QMIN, QMAX, KMIN, KMAX, KV_LO, KV_HI,
    qk_scale, S, Hq, GROUP, NBQ, NBK,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, ssb,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
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
    qmin = tl.load(QMIN + b * NBQ + pid_m)
    qmax = tl.load(QMAX + b * NBQ + pid_m)
    lo = tl.load(KV_LO + b * NBQ + pid_m)
    hi = tl.load(KV_HI + b * NBQ + pid_m)
    uniform_q = qmin == qmax
    first_q = pid_m * BLOCK_M

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for blk in range(lo, hi):
        kmin = tl.load(KMIN + b * NBK + blk)
        kmax = tl.load(KMAX + b * NBK + blk)
        if (kmax >= qmin) & (kmin <= qmax):
            start_n = blk * BLOCK_N
            full = uniform_q & (kmin == kmax) & (kmin == qmin) & (start_n + BLOCK_N - 1 <= first_q) \
                & (start_n + BLOCK_N <= S)
            if full:
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base,
                                           start_n, S, sks, svs, qk_scale, D, BLOCK_N, False, PREC)
            else:
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, seg_q, offs_m, offs_d, k_base, v_base, seg_base,
                                           start_n, S, sks, svs, qk_scale, D, BLOCK_N, True, PREC)
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    o_base = O + b * sob + h * soh
    tl.store(o_base + offs_m[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_in[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + (b * Hq + h) * S + offs_m, lse, mask=m_in)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
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
def _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base, seg_base, start_m, S,
                sqs, sds, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                PREC: tl.constexpr):
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
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DK, DV,
    QMIN, QMAX, KMIN, KMAX, Q_LO, Q_HI,
    qk_scale, sm_scale, S, Hq, Hkv, GROUP, NBQ, NBK,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, ssb,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
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
    kmin = tl.load(KMIN + b * NBK + pid_n)
    kmax = tl.load(KMAX + b * NBK + pid_n)
    lo = tl.load(Q_LO + b * NBK + pid_n)
    hi = tl.load(Q_HI + b * NBK + pid_n)
    uniform_k = kmin == kmax
    last_k = pid_n * BLOCK_N + BLOCK_N - 1

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        lse_base = LSE + (b * Hq + h) * S
        delta_base = DELTA + (b * Hq + h) * S
        for blk in range(lo, hi):
            qmin = tl.load(QMIN + b * NBQ + blk)
            qmax = tl.load(QMAX + b * NBQ + blk)
            if (kmax >= qmin) & (kmin <= qmax):
                start_m = blk * BLOCK_M
                full = uniform_k & (qmin == qmax) & (kmin == qmin) & (last_k <= start_m) \
                    & (start_m + BLOCK_M <= S)
                if full:
                    dk, dv = _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                         seg_base, start_m, S, sqs, sds, qk_scale, D, BLOCK_M, False, PREC)
                else:
                    dk, dv = _dkdv_block(dk, dv, k, v, seg_k, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                                         seg_base, start_m, S, sqs, sds, qk_scale, D, BLOCK_M, True, PREC)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=ld_mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=ld_mask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S, sks, svs,
              qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_in = offs_n < S
    ld_mask = n_in[:, None] & (offs_d < D)[None, :]
    k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=ld_mask, other=0.0)
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


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, SEG, DO, LSE, DELTA, DQ,
    QMIN, QMAX, KMIN, KMAX, KV_LO, KV_HI,
    qk_scale, sm_scale, S, Hq, GROUP, NBQ, NBK,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, ssb, sdqb, sdqs, sdqh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
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
    qmin = tl.load(QMIN + b * NBQ + pid_m)
    qmax = tl.load(QMAX + b * NBQ + pid_m)
    lo = tl.load(KV_LO + b * NBQ + pid_m)
    hi = tl.load(KV_HI + b * NBQ + pid_m)
    uniform_q = qmin == qmax
    first_q = pid_m * BLOCK_M
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for blk in range(lo, hi):
        kmin = tl.load(KMIN + b * NBK + blk)
        kmax = tl.load(KMAX + b * NBK + blk)
        if (kmax >= qmin) & (kmin <= qmax):
            start_n = blk * BLOCK_N
            full = uniform_q & (kmin == kmax) & (kmin == qmin) & (start_n + BLOCK_N - 1 <= first_q) \
                & (start_n + BLOCK_N <= S)
            if full:
                dq = _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S,
                               sks, svs, qk_scale, D, BLOCK_N, False, PREC)
            else:
                dq = _dq_block(dq, q, do, lse, delta, seg_q, offs_m, offs_d, k_base, v_base, seg_base, start_n, S,
                               sks, svs, qk_scale, D, BLOCK_N, True, PREC)
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


def _attn_forward(q, k, v, seg, sm_scale):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    cfg = _config(D, q.dtype)
    bm, bn = cfg["fwd_m"], cfg["fwd_n"]
    qmin, qmax, kmin, kmax, kv_lo, kv_hi, _, _ = _block_ranges(seg, bm, bn)
    o = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    nbq, nbk = qmin.shape[1], kmin.shape[1]
    grid = (nbq, B * Hq)
    _attn_fwd_kernel[grid](
        q, k, v, seg, o, lse, qmin, qmax, kmin, kmax, kv_lo, kv_hi,
        sm_scale * _LOG2E, S, Hq, Hq // Hkv, nbq, nbk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), seg.stride(0),
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=bn, PREC=_prec(q.dtype),
        num_warps=cfg["warps_fwd"], num_stages=cfg["stages"],
    )
    return o, lse


def _attn_backward(do, q, k, v, seg, o, lse, sm_scale):
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    cfg = _config(D, q.dtype)
    bm, bn = cfg["bwd_m"], cfg["bwd_n"]
    block_d = max(16, triton.next_power_of_2(D))
    prec = _prec(q.dtype)
    do = _unit_last(do)
    delta = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(S, 64), B * Hq)](
        o, do, delta, S, Hq, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_M=64,
    )
    qmin, qmax, kmin, kmax, kv_lo, kv_hi, q_lo, q_hi = _block_ranges(seg, bm, bn)
    nbq, nbk = qmin.shape[1], kmin.shape[1]
    dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, S, Hkv, D), dtype=v.dtype, device=v.device)
    qk_scale = sm_scale * _LOG2E
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), seg.stride(0))
    _attn_bwd_dkdv_kernel[(nbk, B * Hkv)](
        q, k, v, seg, do, lse, delta, dk, dv, qmin, qmax, kmin, kmax, q_lo, q_hi,
        qk_scale, sm_scale, S, Hq, Hkv, group, nbq, nbk, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec,
        num_warps=cfg["warps_bwd"], num_stages=cfg["stages"],
    )
    _attn_bwd_dq_kernel[(nbq, B * Hq)](
        q, k, v, seg, do, lse, delta, dq, qmin, qmax, kmin, kmax, kv_lo, kv_hi,
        qk_scale, sm_scale, S, Hq, group, nbq, nbk, *common, dq.stride(0), dq.stride(1), dq.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec,
        num_warps=cfg["warps_bwd"], num_stages=cfg["stages"],
    )
    return dq, dk, dv


class SegmentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, sm_scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _attn_forward(q, k, v, seg, sm_scale)
        ctx.save_for_backward(q, k, v, seg, o, lse)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, seg, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, seg, o, lse, ctx.sm_scale)
        return dq, dk, dv, None, None


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
                                force: Optional[str] = None):
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


def segment_attention(q, k, v, segment_ids, softmax_scale: Optional[float] = None, force: Optional[str] = None):
    """Causal attention within segments; q [B,S,Hq,D], k/v [B,S,Hkv,D], segment_ids [B,S] -> [B,S,Hq,D]."""
    _check(q, k, v, segment_ids)
    if not resolve(force, q):
        return segment_attention_reference(q, k, v, segment_ids, softmax_scale)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("q, k, v must share a dtype on the Triton path")
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    seg = segment_ids.to(torch.int32).contiguous()
    return SegmentAttentionFunction.apply(q, k, v, seg, scale)
