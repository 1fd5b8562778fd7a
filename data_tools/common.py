"""Helpers shared by the build, BPE and streams modules (kept here so that none imports another's
privates and there are no import circles): unit ops, megatron-core dataset writing, malloc settings.
(The manifest's content hash lives in ``megaslm.vocab``: training verifies what data_tools writes.)"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

import megaslm.fsutil as fsutil
from megaslm.vocab import IDX_DTYPE_CODES, IDX_MAGIC, IDX_VERSION, lang_prefix, manifest_path

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


INDEX_BLOCK = 1 << 20      # write_index_blocks: documents per block of the .idx's arrays


def write_index(idx_path: str, dtype, sequence_lengths: np.ndarray) -> None:
    """Write the .idx of a dataset whose documents are single sequences: the bytes megatron-core's
    ``_IndexWriter`` writes (header, version, dtype code, counts, int32 lengths, int64 byte pointers, int64
    document indices; tests/data_tools/test_imports.py compares the two byte for byte).

    Hand-written because megatron-core's writer comes only with its ``indexed_dataset`` module, which
    imports torch and megatron: about 7 s of a ``data_tools build`` that converts 4.5M units in 0.03 s
    (the build otherwise needs neither), and a process that holds torch forks its workers slowly. Its
    pointers are also a Python loop over numpy scalars (~0.5 us per document); here one cumulative sum."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    write_index_blocks(idx_path, dtype, lengths.size,
                       lambda: (lengths[i:i + INDEX_BLOCK] for i in range(0, lengths.size, INDEX_BLOCK)))


def write_index_blocks(idx_path: str, dtype, count: int, blocks: Callable[[], Iterable[np.ndarray]]) -> None:
    """``write_index`` for ``count`` lengths given as blocks: ``blocks()`` returns a fresh iterator over
    them in order (int64 arrays), called twice (the lengths, then the pointers). Memory: a block, however
    many documents (a build keeps its lengths in a file beyond a million documents)."""
    dt = np.dtype(dtype)
    with open(idx_path, "wb") as f:
        f.write(IDX_MAGIC)                  # megatron-core's layout: megaslm.vocab
        f.write(struct.pack("<Q", IDX_VERSION))
        f.write(struct.pack("<B", IDX_DTYPE_CODES[dt.name]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        for lengths in blocks():
            if lengths.size and int(lengths.max()) >= 2 ** 31:
                raise DataError(f"a document of {int(lengths.max())} tokens does not fit megatron-core's int32 "
                                f"lengths", path=idx_path)
            f.write(lengths.astype(np.int32).tobytes())
        at = 0                      # byte pointer of the block's first document
        for lengths in blocks():
            ptr = np.empty(lengths.size, dtype=np.int64)
            if lengths.size:
                ptr[0] = at
                np.cumsum(lengths[:-1] * np.int64(dt.itemsize), out=ptr[1:])
                ptr[1:] += at
                at += int(lengths.sum()) * dt.itemsize
            f.write(ptr.tobytes())
        for i in range(0, count + 1, INDEX_BLOCK):
            f.write(np.arange(i, min(count + 1, i + INDEX_BLOCK), dtype=np.int64).tobytes())


# Errors of a write that did not happen: the disk (or the user's quota) is full, a file-size limit, a
# read-only file system, an I/O error. Any of them is one line (``write_error``), never a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def _mount_point(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_error(e: OSError, path: str, what: str = "the dataset",
                after: str = "nothing was written at the output prefix") -> DataError:
    """A failed write as one line naming the file and, for a full disk or quota, its file system:
    ``PATH: cannot write WHAT (No space left on device: 0 bytes free of 1.0 MiB on the file system at /mnt);
    AFTER``."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            mount = _mount_point(path)
            st = os.statvfs(mount)
            reason += (f": {_bytes(st.f_bavail * st.f_frsize)} free of {_bytes(st.f_blocks * st.f_frsize)} on "
                       f"the file system at {mount}")
        except OSError:
            pass
    return DataError(f"cannot write {what} ({reason}); {after}", path=path)


@contextlib.contextmanager
def writing(path: str, what: str = "the dataset", after: str = "nothing was written at the output prefix"):
    """Run a write of ``path``: an OSError in it becomes ``write_error`` (one line, exit 2 in the CLI)."""
    try:
        yield
    except OSError as e:
        raise write_error(e, path, what, after) from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False, what: Optional[str] = None,
                after: str = "nothing was written at the output prefix"):
    """Write ``path`` whole or not at all: ``megaslm.fsutil.atomic_path`` (the project's one atomic write:
    a temporary name beside ``path``, renamed over it when the block ends, removed if it raises; its fsync
    rule, which data_tools applies where the caller asks, ``fsync``). With ``what``, an OSError is one line
    (``write_error``); one raised by the caller's writes is named while the temporary file still holds
    its space."""
    try:
        with fsutil.atomic_path(path, suffix=suffix, fsync=fsync) as tmp:
            with writing(path, what, after) if what else contextlib.nullcontext():
                yield tmp
    except OSError as e:   # the fsync or the rename
        if what:
            raise write_error(e, path, what, after) from None
        raise


def atomic_write_text(path: str, text: str, fsync: bool = False, **kwargs) -> None:
    """``text`` written to ``path`` (UTF-8) through ``atomic_path`` (its keyword arguments)."""
    with atomic_path(path, fsync=fsync, **kwargs) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def commit_files(moves: Sequence[tuple], what: str = "the dataset",
                 after: str = "nothing was written at the output prefix") -> None:
    """Move finished files into place (renames within one file system): if one fails (a directory that
    needs a new block on a full disk), the ones already moved are removed -- no partial output."""
    done = []
    for src, dst in moves:
        try:
            os.replace(src, dst)
        except OSError as e:
            for d in done:
                with contextlib.suppress(OSError):
                    os.remove(d)
            raise write_error(e, dst, what, after) from None
        done.append(dst)


def staging_dir(prefix: str) -> str:
    """A fresh ``<prefix>.tmp-<pid>/`` (the prefix's directory created if missing), where a dataset is written
    before ``commit_dataset`` moves it into place; DataError (one line) where it cannot be made."""
    tmpdir = f"{prefix}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
        os.makedirs(tmpdir)
    except OSError as e:
        raise DataError(f"cannot create the output here ({e.strerror or e}); expected a writable "
                        f"directory for the prefix", path=prefix) from None
    return tmpdir


def commit_dataset(staged: str, prefix: str, manifest: dict, extra: Sequence[tuple] = (),
                   stale: Sequence[str] = ()) -> None:
    """Move the dataset written at ``staged`` (``.bin/.idx`` and ``.lang.bin/.idx``, in a ``staging_dir``)
    into place at ``prefix`` with its manifest: an old manifest is dropped first (an interrupted commit then
    reads as "no dataset"), the ``stale`` files of an old dataset are removed, the data files and ``extra``
    (src, dst) files are moved, the manifest last."""
    tmp_manifest = os.path.join(os.path.dirname(staged), "manifest.json")
    with writing(tmp_manifest):
        with open(tmp_manifest, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
    if os.path.exists(manifest_path(prefix)):
        os.remove(manifest_path(prefix))
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    moves = [(src + ext, dst + ext) for src, dst in ((staged, prefix), (lang_prefix(staged), lang_prefix(prefix)))
             for ext in (".bin", ".idx")]
    commit_files(moves + list(extra) + [(tmp_manifest, manifest_path(prefix))])


class OutputFiles:
    """The files one command writes (``demo``, ``world``): each written under a temporary name and renamed
    into place when whole (``open``: ``atomic_path``), or registered once another writer has placed it
    (``placed``). If the command fails, the temporary files, the files it placed and the directories it
    created (when empty) are removed: a full disk leaves nothing partial. ``with OutputFiles(...) as out:``."""

    def __init__(self, what: str, after: str = "nothing was left under the output directory"):
        self.what, self.after = what, after
        self.files: list = []
        self.dirs: list = []

    def makedirs(self, path: str) -> None:
        missing = []
        p = os.path.abspath(path)
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        with writing(path, self.what, self.after):
            os.makedirs(path, exist_ok=True)
        self.dirs.extend(missing)           # deepest first

    @contextlib.contextmanager
    def open(self, path: str, mode: str = "w"):
        with atomic_path(path, what=self.what, after=self.after) as tmp:
            with open(tmp, mode) as f:
                yield f
        self.files.append(path)

    def placed(self, *paths: str) -> None:
        self.files.extend(paths)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            for p in self.files:
                with contextlib.suppress(OSError):
                    os.remove(p)
            for d in self.dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(d)             # only when empty
        return False


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
