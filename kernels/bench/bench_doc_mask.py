"""Fused position ids / segment ids / loss mask vs the torch reference (eager, torch.compile).

    python -m kernels.bench.bench_doc_mask            # CUDA
    python -m kernels.bench.bench_doc_mask --dry-run  # CPU plumbing check
"""

from kernels.bench import _bootstrap  # noqa: F401  (must precede any triton import)

import torch  # noqa: E402

from kernels.bench import harness as hz  # noqa: E402
from kernels.doc_mask import doc_positions_and_masks, doc_positions_and_masks_reference  # noqa: E402

EOD, PAD = 0, 1


def run(args, dev):
    device = "cpu" if args.dry_run and not torch.cuda.is_available() else "cuda"
    seqs = [64] if args.dry_run else args.seqs
    rows = []
    for S in seqs:
        B = max(1, (300 if args.dry_run else args.tokens) // S)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(2, 2048, (B, S), generator=gen)
        tokens[torch.rand(B, S, generator=gen) < 1.0 / args.doc_len] = EOD
        tokens = tokens.to(device)
        case = f"B={B} S={S} doc~{args.doc_len}"
        gb = B * S * (8 + 8 + 4 + 4) / 1e9  # read int64 tokens; write int64 pos, int32 seg, fp32 mask
        impls = {
            "triton": lambda: doc_positions_and_masks(tokens, EOD, PAD, force="triton"),
            "eager_reference": lambda: doc_positions_and_masks_reference(tokens, EOD, PAD),
        }
        comp = hz.maybe_compile(doc_positions_and_masks_reference, args)
        if comp is not None:
            impls["compile_reference"] = lambda: comp(tokens, EOD, PAD)
        for name, fn in impls.items():
            rows.append(hz.make_row("doc_mask", case, name, "int64", hz.guarded(lambda: hz.time_ms(fn, args)), dev,
                                    gbytes=gb))
    return rows


def main(argv=None):
    p = hz.base_parser(__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--tokens", type=int, default=153_600)
    p.add_argument("--doc-len", type=int, default=512)
    args = p.parse_args(argv)
    hz.require_cuda_or_dry_run(args)
    dev = hz.measure_device(args)
    rows = run(args, dev)
    hz.add_speedups(rows)
    hz.print_table(rows, dev)
    hz.write_results(rows, dev, args, "doc_mask")
    return rows


if __name__ == "__main__":
    main()
