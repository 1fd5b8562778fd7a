"""The binary inputs of a build (.npy unit arrays with their .bounds.jsonl sidecar, .npz archives): read-only
memory maps, loaded once per build and shared by its converter threads (``clear_caches`` when it ends).

Hand-written around ``np.load``: an .npz member is mapped instead of read into memory, and a plain .npy is mapped
with its pages populated up front (one kernel call, not a fault per page).
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np

from data_tools.errors import DataError, FileError

UNIT_DTYPES = "int8, int16, int32, int64, uint8, uint16, uint32 or uint64"


def unit_dtype_error(dtype, path: str, field: Optional[str] = None) -> DataError:
    return FileError(f"expected integer units ({UNIT_DTYPES}), got dtype {dtype}", path=path, field=field)


def npy_header(path: str) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of a plain 1-D .npy (its header only), or None (unreadable or unusual: the
    loader reports it)."""
    try:
        with open(path, "rb") as f:
            return _read_npy_header(f)
    except (OSError, ValueError):
        return None


def npy_units(path: str) -> int:
    """The number of units in an .npy (from its header; the loader for an unusual one)."""
    header = npy_header(path)
    return header[0][0] if header is not None else int(load_npy(path).shape[0])


_NPZ_CACHE: Dict[str, dict] = {}
_NPY_CACHE: Dict[str, np.ndarray] = {}
# The loaded inputs are shared by a build's converter threads (engine.run_chunks: --workers N over .npy/.npz
# inputs), which may work on chunks of two neighbouring inputs at once: an input is loaded (mapped, its
# offsets read) once, under this lock, and the last few stay loaded until the build ends (clear_caches).
_CACHE_LOCK = threading.Lock()
_CACHE_KEEP = 4


def _cached(cache: dict, path: str, load):
    with _CACHE_LOCK:
        got = cache.get(path)
        if got is None:
            got = load(path)
            while len(cache) >= _CACHE_KEEP:
                cache.pop(next(iter(cache)))        # the input loaded first (a build reads its inputs in order)
            cache[path] = got
        return got


def _read_npy_header(f) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of the .npy array that starts at ``f``'s position, leaving ``f`` at its data; None
    unless it is a plain 1-D array (C order, no objects) of a header version NumPy defines."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    if fortran or dtype.hasobject or len(shape) != 1:
        return None
    return shape, dtype


def _npz_member_memmap(path: str, zf, name: str) -> Optional[np.ndarray]:
    """A read-only memory map of the .npy member ``name`` of an .npz, or None when it cannot be mapped
    (compressed, Fortran order, object dtype...). Hand-written because ``np.load(mmap_mode=...)`` maps plain
    .npy files only and reads every .npz member into memory: a copy of the whole unit stream before a build
    starts. ``np.savez`` stores members uncompressed, so the member's bytes lie contiguously in the file,
    after the zip local header and the .npy header."""
    import zipfile

    try:
        info = zf.getinfo(name + ".npy")
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        header = _read_npy_header(f)
        data = f.tell()
    if header is None:
        return None
    shape, dtype = header
    if data + int(np.prod(shape)) * dtype.itemsize > start + info.file_size:
        return None
    if shape[0] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data, shape=shape)


def load_npz(path: str) -> dict:
    """The arrays of an .npz (cached for the build: ``clear_caches``); ``units`` memory-mapped when stored."""
    return _cached(_NPZ_CACHE, path, _read_npz)


def _read_npz(path: str) -> dict:
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            units = _npz_member_memmap(path, zf, "units")
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files if not (k == "units" and units is not None)}
        if units is not None:
            d["units"] = units
    except Exception as e:  # noqa: BLE001 - any unreadable archive
        raise DataError(f"cannot read .npz ({e})", path=path) from None
    for k in ("units", "offsets"):
        if k not in d:
            raise DataError("array missing", path=path, field=k)
    if d["units"].dtype.kind not in "iu":
        raise unit_dtype_error(d["units"].dtype, path, "units")
    off = d["offsets"]
    if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 2 or off[0] != 0 \
            or np.any(np.diff(off) < 0) or off[-1] != len(d["units"]):
        raise DataError("expected N+1 non-decreasing boundaries from 0 to len(units)", path=path,
                        field="offsets")
    return d


def clear_caches() -> None:
    """Forget the loaded .npy/.npz inputs (a build calls it when it ends: a later build, in the same
    process, reads its inputs again instead of reusing arrays that may have changed on disk)."""
    with _CACHE_LOCK:
        _NPZ_CACHE.clear()
        _NPY_CACHE.clear()


def _npy_populated(path: str) -> Optional[np.ndarray]:
    """A read-only map of a plain 1-D .npy with its pages mapped up front (MAP_POPULATE: one batched
    kernel call instead of a fault per page as the build first reads them), or None (then np.load)."""
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if not flags:
        return None
    try:
        with open(path, "rb") as f:
            header = _read_npy_header(f)
            start = f.tell()
            if header is None or header[0][0] == 0:
                return None
            shape, dtype = header
            if start + shape[0] * dtype.itemsize > os.fstat(f.fileno()).st_size:
                return None
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | flags, prot=mmap.PROT_READ)
        return np.frombuffer(mm, dtype=dtype, count=shape[0], offset=start)
    except Exception:  # noqa: BLE001 - anything unusual: np.load reads it (or names what is wrong)
        return None


def load_npy(path: str) -> np.ndarray:
    """The unit array of an .npy, memory-mapped (cached for the build: ``clear_caches``)."""
    return _cached(_NPY_CACHE, path, _read_npy)


def _read_npy(path: str) -> np.ndarray:
    try:
        arr = _npy_populated(path)
        if arr is None:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read .npy ({e})", path=path) from None
    if arr.ndim != 1:
        raise DataError(f"expected a 1-D unit array, got shape {arr.shape}", path=path, field="units")
    if arr.dtype.kind not in "iu":
        raise unit_dtype_error(arr.dtype, path)
    return arr


__all__ = ["UNIT_DTYPES", "unit_dtype_error", "npy_header", "npy_units", "load_npy", "load_npz", "clear_caches"]
