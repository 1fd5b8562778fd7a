"""The one atomic file write (torch-free, standard library only: data_tools and the sweeps may use it).

A file written whole goes through a temporary name in the same directory (``<path>.tmp-<pid><suffix>``),
then ``os.replace`` over ``path``: a reader, or a run killed mid-write, sees the old file or the new one,
never a part; the temporary file is removed if the write fails.

The fsync rule, once: with ``fsync=True`` (the default) the file's data is flushed to disk before the
rename and the directory after it, so that after a power loss or a kernel crash the name holds the old
file or the new one, never an empty one. Pass ``fsync=False`` only for what can be rebuilt from other
files (a cache, an index listing, an autotuning table): it saves two disk flushes per write.

Directories (a checkpoint's ``.tmp`` folder renamed to its tag) are not files written whole: they keep
their own rename, in ``megaslm.checkpoint``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some file systems refuse fsync on a directory: the rename is as durable as they make it
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = True) -> Iterator[str]:
    """Yield a temporary name beside ``path`` for the caller to write; when the block ends it is renamed
    over ``path`` (after the fsync rule above), or removed if the block raises. ``suffix`` ends the
    temporary name, for writers that pick the format from the extension (``np.save``, ``soundfile``)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str, fsync: bool = True) -> None:
    """``text`` (UTF-8, newlines as given) written whole to ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def atomic_write_json(path: str, obj: Any, fsync: bool = True, **dumps) -> None:
    """``json.dumps(obj, **dumps)`` written whole to ``path``."""
    atomic_write_text(path, json.dumps(obj, **dumps), fsync=fsync)
