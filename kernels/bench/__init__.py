"""Benchmarks (not tests): ``python -m kernels.bench.bench_all`` on a CUDA machine; ``--dry-run`` on CPU.

Each script must be started as a program: ``--dry-run`` has to set TRITON_INTERPRET before triton is
imported, so the scripts do that in their first lines, before importing ``kernels``.
"""
