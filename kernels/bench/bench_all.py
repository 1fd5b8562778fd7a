"""Every kernel benchmark into one record (docs/bench/bench_all-<device>-<date>.json/.csv; kernels/bench/record.py).

    python -m kernels.bench.bench_all                # CUDA: paper shapes, S = 2048 and 8192
    python -m kernels.bench.bench_all --long         # also S = 16384 and 32768 for attention
    python -m kernels.bench.bench_all --dry-run      # CPU plumbing check
"""

from kernels.bench import _bootstrap  # noqa: F401  (must precede any triton import)

import argparse  # noqa: E402

from kernels.bench import bench_attention, bench_doc_mask, bench_embedding  # noqa: E402
from kernels.bench import harness as hz  # noqa: E402


def main(argv=None):
    p = hz.base_parser(__doc__.splitlines()[0])
    p.add_argument("--long", action="store_true", help="add attention at S=16384 and 32768")
    p.add_argument("--only", nargs="+", choices=["embedding", "attention", "doc_mask"],
                   default=["embedding", "attention", "doc_mask"])
    args = p.parse_args(argv)
    hz.require_cuda_or_dry_run(args)
    dev = hz.measure_device(args)
    rows = []
    if "embedding" in args.only:
        rows += bench_embedding.run(argparse.Namespace(**vars(args), tokens=153_600), dev)
    if "attention" in args.only:
        seqs = [2048, 8192] + ([16384, 32768] if args.long else [])
        rows += bench_attention.run(argparse.Namespace(
            **vars(args), seqs=seqs, models=list(bench_attention.MODELS), tokens=16_384, doc_lens=[50, 400],
            max_reference_seq=4096), dev)
    if "doc_mask" in args.only:
        rows += bench_doc_mask.run(argparse.Namespace(**vars(args), seqs=[2048, 8192, 32768], tokens=153_600,
                                                      doc_len=512), dev)
    hz.add_speedups(rows)
    hz.print_table(rows, dev)
    if "attention" in args.only:
        bench_attention.print_targets(rows)
    hz.write_results(rows, dev, args, "all")
    return rows


if __name__ == "__main__":
    main()
