"""Fused unit embedding vs torch eager (megatron's mask/subtract/gather/zero), torch.compile, reference.

Targets (H100): forward >= 80% of measured copy bandwidth; backward >= 2x torch's at vocabulary 2048,
153,600 tokens, hidden 2048.

    python -m kernels.bench.bench_embedding            # CUDA
    python -m kernels.bench.bench_embedding --dry-run  # CPU plumbing check
"""

from kernels.bench import _bootstrap  # noqa: F401  (must precede any triton import)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.bench import harness as hz  # noqa: E402
from kernels.embedding import embedding_reference, fused_unit_embedding  # noqa: E402


def megatron_style(ids, weight, vocab_start, lang_ids, lang_weight, scale):
    """What megatron-core's VocabParallelEmbedding does locally (plus our language add), in torch ops."""
    V = weight.shape[0]
    mask = (ids < vocab_start) | (ids >= vocab_start + V)
    masked = ids - vocab_start
    masked[mask] = 0
    out = F.embedding(masked, weight)
    out[mask, :] = 0.0
    if scale != 1.0:
        out = out * scale
    if lang_weight is not None:
        out = out + F.embedding(lang_ids, lang_weight)
    return out


def cases(args):
    if args.dry_run:
        return [dict(tokens=300, vocab=64, shard=32, hidden=48, langs=2)]
    out = []
    for hidden in (896, 2048):
        out.append(dict(tokens=args.tokens, vocab=2048, shard=2048, hidden=hidden, langs=0))
        out.append(dict(tokens=args.tokens, vocab=2048, shard=2048, hidden=hidden, langs=4))
        out.append(dict(tokens=args.tokens, vocab=2048, shard=1024, hidden=hidden, langs=4))  # TP=2 shard
    return out


def run(args, dev):
    device = "cpu" if args.dry_run and not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    for c in cases(args):
        g = torch.Generator().manual_seed(0)
        N, V, Vs, H, L = c["tokens"], c["vocab"], c["shard"], c["hidden"], c["langs"]
        vocab_start = V - Vs  # last shard: exercises the subtract / mask path
        case = f"N={N} V={V} shard={Vs} H={H} L={L}"
        ids = torch.randint(0, V, (N,), generator=g).to(device)
        lang_ids = torch.randint(0, L, (N,), generator=g).to(device) if L else None
        w = (torch.randn(Vs, H, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
        lw = (torch.randn(L, H, generator=g) * 0.02).to(device, dtype).requires_grad_(True) if L else None
        go = torch.randn(N, H, generator=g).to(device, dtype)
        elt = w.element_size()
        # bytes: ids (+ lang ids) + one gathered row read per token + the output write
        fwd_gb = (N * 8 * (2 if L else 1) + 2 * N * H * elt) / 1e9
        # bytes: ids + grad read + table-gradient write (+ language table gradient)
        bwd_gb = (N * 8 * (2 if L else 1) + N * H * elt + (Vs + L) * H * elt) / 1e9

        impls = {
            "triton": lambda: fused_unit_embedding(ids, w, vocab_start, lang_ids, lw, 1.0, True, force="triton"),
            "triton_atomic": lambda: fused_unit_embedding(ids, w, vocab_start, lang_ids, lw, 1.0, False,
                                                          force="triton"),
            "eager_megatron": lambda: megatron_style(ids, w, vocab_start, lang_ids, lw, 1.0),
            "eager_reference_fp32": lambda: embedding_reference(ids, w, vocab_start, lang_ids, lw, 1.0),
        }
        compiled = hz.maybe_compile(megatron_style, args)
        if compiled is not None:
            impls["compile_megatron"] = lambda: compiled(ids, w, vocab_start, lang_ids, lw, 1.0)
        params = [w] + ([lw] if lw is not None else [])
        for name, fn in impls.items():
            if name != "triton_atomic":  # forward does not depend on the backward mode
                with torch.no_grad():
                    t = hz.guarded(lambda: hz.time_ms(fn, args))
                rows.append(hz.make_row("embedding_fwd", case, name, dtype, t, dev, gbytes=fwd_gb))

            def bwd_timing(fn=fn):
                out = fn()
                return hz.time_ms(lambda: torch.autograd.grad(out, params, go.view_as(out), retain_graph=True),
                                  args)
            rows.append(hz.make_row("embedding_bwd", case, name, dtype, hz.guarded(bwd_timing), dev, gbytes=bwd_gb))
        del w, lw, go, ids, lang_ids
    return rows


def main(argv=None):
    p = hz.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=153_600, help="tokens per GPU step")
    args = p.parse_args(argv)
    hz.require_cuda_or_dry_run(args)
    dev = hz.measure_device(args)
    rows = run(args, dev)
    hz.add_speedups(rows)
    hz.print_table(rows, dev)
    hz.write_results(rows, dev, args, "embedding")
    return rows


if __name__ == "__main__":
    main()
