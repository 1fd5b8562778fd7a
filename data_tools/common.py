"""Helpers shared by the build, BPE and streams modules (kept here so that none imports another's
privates and there are no import circles): unit ops, megatron-core dataset writing, malloc settings.
(The manifest's content hash lives in ``megaslm.vocab``: training verifies what data_tools writes.)"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data_tools.errors import DataError


def dedup_units(units: np.ndarray) -> np.ndarray:
    """Collapse runs of repeated consecutive units."""
    if units.size < 2:
        return units
    keep = np.empty(units.size, dtype=bool)
    keep[0] = True
    np.not_equal(units[1:], units[:-1], out=keep[1:])
    return units[keep]


def token_dtype(vocab_size: int):
    """megatron-core's ``DType.optimal_dtype`` rule (uint16 below 65500 tokens, else int32), restated here so
    that a build does not import megatron-core (and torch) before it forks its workers: forking a process
    that holds torch costs ~0.1 s per pool. tests/data_tools/test_imports.py checks it equals megatron-core's."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def new_builder(path_prefix: str, dtype):
    """megatron-core's IndexedDatasetBuilder writing ``<path_prefix>.bin``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder(path_prefix + ".bin", dtype=dtype)


def write_index(idx_path: str, dtype, sequence_lengths: np.ndarray) -> None:
    """Write the .idx of a dataset whose documents are single sequences, with megatron-core's
    ``_IndexWriter`` (header, dtype code, layout: the same bytes as ``IndexedDatasetBuilder.finalize``).

    Hand-written part: the sequence pointers. megatron-core computes them with a Python loop over
    numpy scalars (~0.5 us per document); here they are one cumulative sum, with the same values."""
    from megatron.core.datasets.indexed_dataset import DType, _IndexWriter

    class _VectorIndexWriter(_IndexWriter):
        def _sequence_pointers(self, lengths):
            lengths = np.asarray(lengths, dtype=np.int64)
            ptr = np.zeros(lengths.size, dtype=np.int64)
            np.cumsum(lengths[:-1] * np.int64(DType.size(self.dtype)), out=ptr[1:])
            return ptr

    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) >= 2 ** 31:
        raise DataError(f"a document of {int(lengths.max())} tokens does not fit megatron-core's int32 lengths",
                        path=idx_path)
    with _VectorIndexWriter(idx_path, dtype) as w:
        w.write(lengths, None, np.arange(lengths.size + 1, dtype=np.int64))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in this process: arrays up to 32 MiB come from the heap (not
    one mmap each) and the heap is not trimmed after every free. A build allocates and frees a few MiB of
    temporaries per chunk; with the defaults every one of them is a fresh mapping whose pages fault in on
    first touch (measured: about half the CPU time of a JSONL build). Process-wide and irreversible, so it
    is called only where the process is ours: the ``data_tools build`` CLI, the build's pool workers and the
    benchmark that stands for the CLI -- never from ``build_dataset`` itself. Returns False where this is not
    glibc (nothing changed there)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
