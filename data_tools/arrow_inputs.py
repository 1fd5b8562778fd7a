"""Hugging Face dataset inputs of a build, read through pyarrow: parquet files, Arrow IPC files (the ``.arrow``
files ``datasets`` writes are IPC *streams*; IPC *files* are read too) and ``save_to_disk`` folders (a
``Dataset`` folder: ``dataset_info.json``, ``state.json`` listing its ``data-*.arrow`` shards; a
``DatasetDict`` folder: ``dataset_dict.json`` and one such folder per split).

A table input is one utterance per row: a unit column (a list of integers, or a string of slamkit's
``<UnN>`` tokens), and optional id, language and duration columns. Its records are its rows, numbered from 1
like the lines of a JSONL (``FILE:ROW: field ...``). A build cuts it into chunks of rows that never cross a
parquet row group (``chunks``); a chunk is read as whole columns (``chunk_columns``: the list column's offsets
and flattened values as NumPy arrays, no Python object per unit) and converted by ``fast.arrow_chunk``; a chunk
that path cannot vouch for goes record by record: ``row_object`` hands each row to the JSONL record path
(``formats.parse_item``) as the JSON object its line would be, so errors, quarantine entries and output bytes
are those of the JSONL of the same units.

Only this module imports pyarrow (and only when a table input is read).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from data_tools.errors import DataError, FileError

# Unit columns recognised without --unit-column, in this order: ``units`` (slamkit's audio_represent output and
# the JSONL utterances' field; textless-lib's tokenised datasets use it too) and ``audio_repr`` (slamkit's
# prepare_tokens lines: a string of <UnN> tokens, or the {units, duration} struct of its extract_features).
UNIT_COLUMNS = ("units", "audio_repr")
ID_COLUMNS = ("file_name", "id")
LANG_COLUMN = "lang"
DURATION_COLUMN = "duration"
TABLE_SUFFIXES = (".parquet", ".arrow")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
RECOGNISED = ("JSONL (.jsonl/.json), .npy (+ .bounds.jsonl), .npz, parquet (.parquet), Arrow IPC (.arrow, stream "
              "or file) or a Hugging Face save_to_disk folder")


@dataclasses.dataclass(frozen=True)
class TableOptions:
    """Which columns and split of a table input to read (None: the defaults above; split: "train")."""
    unit: Optional[str] = None
    id: Optional[str] = None
    lang: Optional[str] = None
    duration: Optional[str] = None
    split: Optional[str] = None


def sniff(path: str) -> str:
    """The format of an input by its name, else by its first bytes: "jsonl", "npy", "npz", "table", or an
    error naming the formats recognised (a parquet file named .bin used to fail as invalid UTF-8 JSON)."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, m)) for m in HF_MARKERS):
            return "table"
        raise FileError(f"a folder, not a Hugging Face save_to_disk dataset (no {' / '.join(HF_MARKERS)}); "
                        f"expected {RECOGNISED}", path=path)
    for ext, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".npy", "npy"), (".npz", "npz")):
        if path.endswith(ext):
            return kind
    if path.endswith(TABLE_SUFFIXES):
        return "table"
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return "jsonl"                      # not found / unreadable: check_inputs names it
    if head.startswith(b"PAR1") or head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "table"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if not head.strip() or head.lstrip()[:1] == b"{":
        return "jsonl"                      # JSON lines under another name (an empty file: no records)
    raise FileError(f"unrecognised input format (starts with {head[:8]!r}); expected {RECOGNISED}", path=path)


def _hf_split_dir(path: str, split: Optional[str]) -> str:
    """A save_to_disk folder -> the Dataset folder to read: itself, or the chosen split of a DatasetDict."""
    dd = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(dd):
        if split not in (None, "train"):
            raise FileError(f"--split {split}: a single-split save_to_disk folder (no dataset_dict.json)", path=path)
        return path
    try:
        with open(dd) as f:
            splits = list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileError(f"unreadable dataset_dict.json ({e}); expected {{\"splits\": [...]}}", path=path) from None
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else splits[0]
    if split not in splits:
        raise FileError(f"no split {split!r}: the DatasetDict has {splits}; choose one with --split", path=path)
    return os.path.join(path, split)


def _shards(folder: str) -> List[str]:
    """The ``data-*.arrow`` shards of a Dataset folder, in ``state.json``'s order."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileError(f"unreadable state.json ({e}); expected save_to_disk's {{\"_data_files\": "
                        f"[{{\"filename\": ...}}]}}", path=folder) from None
    return [os.path.join(folder, name) for name in files]


def _read_ipc(path: str):
    """An Arrow IPC stream or file -> a pyarrow Table over a memory map (no copy)."""
    import pyarrow as pa
    try:
        source = pa.memory_map(path, "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as e:
        raise FileError(f"cannot read as Arrow IPC ({e})", path=path) from None


class Table:
    """A table input: its rows in pieces (a parquet file's row groups, decoded when read; else one memory-mapped
    table), the columns it reads, and the columns it ignores."""

    def __init__(self, path: str, opts: Optional[TableOptions]):
        import pyarrow as pa
        import pyarrow.parquet as pq
        opts = opts or TableOptions()
        self.path, self.parquet, self._lock, self._decoded = path, None, threading.Lock(), {}
        target = _hf_split_dir(path, opts.split) if os.path.isdir(path) else path
        try:
            with open(target if os.path.isfile(target) else os.devnull, "rb") as f:
                parquet = f.read(4) == b"PAR1" or target.endswith(".parquet")
            if parquet:
                self.parquet = pq.ParquetFile(target, memory_map=True)
                schema = self.parquet.schema_arrow
                md = self.parquet.metadata
                rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            else:
                parts = [_read_ipc(p) for p in (_shards(target) if os.path.isdir(target) else [target])]
                self.table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
                schema, rows = self.table.schema, [self.table.num_rows]
        except pa.ArrowException as e:
            raise FileError(f"cannot read as parquet ({e})", path=path) from None
        self.starts = [0] + list(np.cumsum(rows, dtype=np.int64).tolist())
        self.columns = self._resolve(schema, opts)
        self.unknown = frozenset(set(schema.names) - {c for c in self.columns.values() if c})

    def _resolve(self, schema, opts: TableOptions) -> Dict[str, Optional[str]]:
        names = schema.names

        def pick(given, defaults, what, flag):
            if given is not None:
                if given not in names:
                    raise FileError(f"no column {given!r} ({flag}); the table has {names}", path=self.path)
                return given
            return next((c for c in defaults if c in names), None)

        cols = {"unit": pick(opts.unit, UNIT_COLUMNS, "unit", "--unit-column"),
                "id": pick(opts.id, ID_COLUMNS, "id", "--id-column"),
                "lang": pick(opts.lang, (LANG_COLUMN,), "lang", "--lang-column"),
                "duration": pick(opts.duration, (DURATION_COLUMN,), "duration", "--duration-column")}
        if cols["unit"] is None:
            raise FileError(f"no unit column: expected one of {list(UNIT_COLUMNS)} or --unit-column NAME; the table "
                            f"has {names}", path=self.path)
        return cols

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def piece_end(self, row: int) -> int:
        """The end (exclusive, 0-based) of the piece holding ``row``: chunks stop there."""
        return self.starts[bisect.bisect_right(self.starts, row)]

    def slice(self, row: int, count: int):
        """Rows [row, row + count) (0-based, within one piece) of the columns read, as a pyarrow Table."""
        if self.parquet is None:
            return self.table.slice(row, count)
        import pyarrow as pa
        i = bisect.bisect_right(self.starts, row) - 1
        with self._lock:
            t = self._decoded.get(i)
            if t is None:
                try:
                    t = self.parquet.read_row_group(i, columns=[c for c in self.columns.values() if c])
                except (OSError, pa.ArrowException) as e:
                    raise FileError(f"cannot read parquet row group {i} ({e})", path=self.path) from None
                while len(self._decoded) >= 2:      # two decoded row groups at most (two converter threads)
                    self._decoded.pop(next(iter(self._decoded)))
                self._decoded[i] = t
        return t.slice(row - self.starts[i], count)


_CACHE: Dict[tuple, Table] = {}
_CACHE_LOCK = threading.Lock()


def load(path: str, opts: Optional[TableOptions]) -> Table:
    """The table input at ``path`` (kept until ``clear_cache``: the converter threads share it)."""
    key = (path, opts)
    with _CACHE_LOCK:
        t = _CACHE.get(key)
        if t is None:
            t = _CACHE[key] = Table(path, opts)
        return t


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def chunks(fi: int, path: str, opts: Optional[TableOptions], size: int) -> Iterator[Tuple[int, int, int]]:
    """(input index, first row (1-based), row count) of each chunk: ``size`` rows, never across a piece."""
    t = load(path, opts)
    row = 0
    while row < t.rows:
        n = min(size, t.piece_end(row) - row)
        yield fi, row + 1, n
        row += n


def row_object(path: str, opts: Optional[TableOptions], line: int) -> Tuple[dict, str]:
    """Row ``line`` (1-based) as the JSON object its JSONL line would be ({"units": [...]} or {"audio_repr":
    "..."}, with "id", "lang", "duration" when the row has them; nulls are absent), and the unit column's name."""
    t = load(path, opts)
    cols = t.columns
    row = t.slice(line - 1, 1).to_pylist()[0]
    unit = row[cols["unit"]]
    obj = {}
    if isinstance(unit, dict) and "units" in unit:          # slamkit's extract_features {units, duration}
        unit = unit["units"]
        if row[cols["unit"]].get("duration") is not None:
            obj["duration"] = row[cols["unit"]]["duration"]
    obj["audio_repr" if isinstance(unit, str) else "units"] = unit
    for key, col in (("id", cols["id"]), ("lang", cols["lang"]), ("duration", cols["duration"])):
        if col is not None and row.get(col) is not None:
            obj[key] = row[col]
    return obj, cols["unit"]


def _list_parts(col, numeric: bool = False) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A list column without nulls, of integers (``numeric``: or floats) -> (flattened values, row counts) as
    NumPy arrays (the list offsets and the values buffer: no Python object per element), or None."""
    import pyarrow.types as pt
    if not (pt.is_list(col.type) or pt.is_large_list(col.type)) or col.null_count:
        return None
    vt = col.type.value_type
    if not (pt.is_integer(vt) or (numeric and pt.is_floating(vt))):
        return None
    offsets = np.asarray(col.offsets)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if values.null_count:
        return None
    return np.asarray(values), np.diff(offsets).astype(np.int64)


def _frames(col, counts: np.ndarray) -> Optional[np.ndarray]:
    """A duration column (frames per unit) -> each row's frames, as the JSONL path rounds them, or None."""
    got = _list_parts(col, numeric=True)
    if got is None or not np.array_equal(got[1], counts):
        return None
    v = got[0]
    if v.size and not np.all(v >= 0):
        return None
    starts = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return np.rint(np.add.reduceat(v, starts)).astype(np.int64)


def chunk_columns(path: str, opts: Optional[TableOptions], first: int, count: int, table: Dict[str, int],
                  default_lang: str):
    """Rows first..first+count-1 (1-based) -> (units, row counts, language ids, frames, ignored column names), or
    None unless every row holds a non-empty list of integers (no nulls), a known language (or none) and, if
    any, one non-negative frame count per unit: the record path decides the rest."""
    import pyarrow.compute as pc
    import pyarrow.types as pt
    t = load(path, opts)
    rows = t.slice(first - 1, count)
    cols = t.columns
    unit_col = rows.column(cols["unit"]).combine_chunks()
    units_of = unit_col.field("units") if pt.is_struct(unit_col.type) and \
        unit_col.type.get_field_index("units") >= 0 else unit_col
    got = _list_parts(units_of)
    if got is None:
        return None
    units, counts = got
    if counts.size != count or not np.all(counts > 0):
        return None
    lang_ids = np.full(count, table[default_lang], dtype=np.uint8)
    if cols["lang"] is not None:
        enc = pc.dictionary_encode(rows.column(cols["lang"]).combine_chunks())
        try:
            ids = np.array([table[x] for x in enc.dictionary.to_pylist()] + [table[default_lang]], dtype=np.uint8)
        except (KeyError, TypeError):
            return None
        idx = enc.indices.fill_null(len(ids) - 1)
        lang_ids = ids[np.asarray(idx)]
    frames = counts
    dur = rows.column(cols["duration"]).combine_chunks() if cols["duration"] is not None else None
    if dur is None and pt.is_struct(unit_col.type) and unit_col.type.get_field_index("duration") >= 0:
        dur = unit_col.field("duration")                    # slamkit's {units, duration} struct
    if dur is not None:
        frames = _frames(dur, counts)
        if frames is None:
            return None
    return units, counts, lang_ids, frames, set(t.unknown)


__all__ = ["UNIT_COLUMNS", "RECOGNISED", "TableOptions", "sniff", "load", "clear_cache", "chunks", "row_object",
           "chunk_columns"]
