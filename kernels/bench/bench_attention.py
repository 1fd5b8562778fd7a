"""Segment (document-masked) causal attention: Triton vs SDPA with a dense mask, FlexAttention with a
document block mask, torch.compile'd and eager dense references.  Forward and forward+backward.

Targets (H100, bf16, head dim 64): forward+backward at least as fast as FlexAttention with the same
document mask at sequence 2048 and 8192, and >= 3x SDPA with a dense mask.

    python -m kernels.bench.bench_attention                 # CUDA, paper shapes at S=2048, 8192
    python -m kernels.bench.bench_attention --seqs 2048 8192 16384 32768
    python -m kernels.bench.bench_attention --dry-run       # CPU plumbing check
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kernels.bench import _bootstrap  # noqa: E402,F401  (must precede any triton import)


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.bench import harness as hz  # noqa: E402
from kernels.attention import segment_attention, segment_attention_reference  # noqa: E402

# the paper's model shapes at TP=1: name -> (hidden, query heads, kv heads); head dim 64
MODELS = {"h896": (896, 14, 2), "h2048": (2048, 32, 8)}


def doc_segments(B, S, mean_len, gen, device):
    """Packed rows of documents with exponential lengths (>= 1), as per-token segment ids [B, S]."""
    segs = []
    for _ in range(B):
        lengths, total = [], 0
        while total < S:
            n = max(1, int(torch.empty(1).exponential_(1.0 / mean_len, generator=gen).item()))
            n = min(n, S - total)
            lengths.append(n)
            total += n
        segs.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(segs).to(device, torch.int32)


def allowed_pairs(seg):
    """Number of (query, key) pairs the mask allows: sum over documents of n (n + 1) / 2."""
    total = 0
    for r in seg.long().cpu():
        counts = torch.bincount(r)
        total += int((counts * (counts + 1) // 2).sum())
    return total


def sdpa_dense(q, k, v, seg):
    S = q.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B, 1, S, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def make_flex(seg, S, device, args):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])

    block_mask = create_block_mask(doc_causal, seg.shape[0], None, S, S, device=device)
    flex = flex_attention if args.dry_run else torch.compile(flex_attention)

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                   enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return run


def cases(args):
    if args.dry_run:
        return [dict(model="tiny", hq=4, hkv=2, S=64, B=2, D=64)]
    out = []
    for S in args.seqs:
        B = max(1, args.tokens // S)
        for name in args.models:
            hidden, hq, hkv = MODELS[name]
            out.append(dict(model=name, hq=hq, hkv=hkv, S=S, B=B, D=64))
    return out


def run(args, dev):
    device = "cpu" if args.dry_run and not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    for c in cases(args):
        gen = torch.Generator().manual_seed(0)
        B, S, Hq, Hkv, D = c["B"], c["S"], c["hq"], c["hkv"], c["D"]
        mean_len = args.doc_len if not args.dry_run else 12
        seg = doc_segments(B, S, mean_len, gen, device)
        pairs = allowed_pairs(seg)
        case = f"{c['model']} B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} doc~{mean_len} density={pairs / (B * S * S):.3f}"
        mk = lambda h: (torch.randn(B, S, h, D, generator=gen) * 0.5).to(device, dtype).requires_grad_(True)  # noqa
        q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
        go = torch.randn(B, S, Hq, D, generator=gen).to(device, dtype)
        fwd_tflop = 4.0 * D * Hq * pairs / 1e12  # QK^T and PV over allowed pairs only
        fb_tflop = 3.5 * fwd_tflop  # backward = 2.5x forward (5 matmuls vs 2)

        impls = {
            "triton": lambda q, k, v: segment_attention(q, k, v, seg, force="triton"),
            "sdpa_dense_mask": lambda q, k, v: sdpa_dense(q, k, v, seg),
        }
        try:
            impls["flex_doc_mask"] = make_flex(seg, S, device, args)
        except Exception as e:  # noqa: BLE001
            rows.append(hz.make_row("attention_fwd", case, "flex_doc_mask", dtype,
                                    {"ms": float("nan"), "status": f"error {type(e).__name__}"}, dev))
        if S <= args.max_reference_seq:
            impls["eager_reference_fp32"] = lambda q, k, v: segment_attention_reference(q, k, v, seg)
            comp = hz.maybe_compile(segment_attention_reference, args)
            if comp is not None:
                impls["compile_reference"] = lambda q, k, v: comp(q, k, v, seg)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        for name, fn in impls.items():
            with torch.no_grad():
                t = hz.guarded(lambda: hz.time_ms(lambda: fn(qd, kd, vd), args))
            rows.append(hz.make_row("attention_fwd", case, name, dtype, t, dev, tflop=fwd_tflop))

            def fwd_bwd(fn=fn):
                def step():
                    out = fn(q, k, v)
                    torch.autograd.grad(out, (q, k, v), go)
                return hz.time_ms(step, args)
            rows.append(hz.make_row("attention_fwd_bwd", case, name, dtype, hz.guarded(fwd_bwd), dev,
                                    tflop=fb_tflop))
        del q, k, v, go
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = hz.base_parser(__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, default=16_384,
                   help="tokens per call (B = tokens // S); attention cost is linear in B, so a "
                        "153,600-token step is 153600/tokens calls")
    p.add_argument("--doc-len", type=int, default=512, help="mean document length (exponential)")
    p.add_argument("--max-reference-seq", type=int, default=4096,
                   help="skip the dense fp32 references (eager / compile) above this sequence length")
    args = p.parse_args(argv)
    hz.require_cuda_or_dry_run(args)
    dev = hz.measure_device(args)
    rows = run(args, dev)
    hz.add_speedups(rows)
    hz.print_table(rows, dev)
    hz.write_results(rows, dev, args, "attention")
    return rows


if __name__ == "__main__":
    main()
