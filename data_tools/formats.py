"""Input formats, read as a stream of small items and parsed/validated one record at a time.

Formats (docs/data_tools.md has an example of each):

* ``jsonl`` -- one JSON object per line, either
  - an utterance (slamkit features): ``{"file_name": "a.flac", "units": [...], "duration": [...], "lang": "en"}``
    (``duration`` and ``lang`` optional; ``duration`` = frames per unit, used for hours), or
  - a slamkit tokenised line (what slamkit's ``prepare_tokens`` writes with its unit tokeniser):
    ``{"file_name": "a.flac", "audio_repr": "<Un12><Un907><Un3>"}`` (units only; other fields kept as metadata), or
  - a sentence-aligned story: ``{"id": "s0", "en": [[...], [...]], "fr": [[...], [...]]}``
    (one list of units per sentence, the same number of sentences in every language).
* ``npy`` -- ``X.npy``: a 1-D integer array of all units concatenated, with the sidecar
  ``X.bounds.jsonl``: one line per utterance ``{"id": "u0", "start": 0, "end": 412, "lang": "en"}``;
  or ``X.npz`` with arrays ``units`` (1-D) and ``offsets`` (N+1 cumulative boundaries), optional
  ``ids`` and ``langs`` (N strings).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import mmap
import os
import re
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import orjson

from data_tools import arrow_inputs
from data_tools.arrays import load_npy, load_npz, npy_header, unit_dtype_error
from data_tools.errors import DataError, FileError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    path: str
    source: str          # name used for per-source token counts
    table: Optional[arrow_inputs.TableOptions] = None   # parquet / Arrow / save_to_disk: columns and split

    @classmethod
    def parse(cls, spec: str, table: Optional[arrow_inputs.TableOptions] = None) -> "InputSpec":
        """``PATH`` or ``NAME=PATH`` (the source name defaults to the file's stem)."""
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            path, name = spec, ""
        if not name:
            base = os.path.basename(path.rstrip("/"))
            for ext in (".jsonl", ".json", ".npy", ".npz") + arrow_inputs.TABLE_SUFFIXES:
                if base.endswith(ext):
                    base = base[: -len(ext)]
            name = base
        return cls(path=path, source=name, table=table)

    @property
    def kind(self) -> str:
        """"jsonl", "npy", "npz" or "table" (parquet, Arrow IPC, save_to_disk): by name, else by content
        (``arrow_inputs.sniff``: an unrecognised format is one error naming those recognised)."""
        return _kind(self.path)


@functools.lru_cache(maxsize=256)
def _kind(path: str) -> str:
    return arrow_inputs.sniff(path)


def bounds_path(npy_path: str) -> str:
    return npy_path[: -len(".npy")] + ".bounds.jsonl"


# The unit dtypes of .npy/.npz inputs: integers of 8-64 bits, signed or not, either byte order. Each is
# range-checked in its own signedness (an int8 -5 is a negative unit, not 251). Floats, bool, complex,
# strings and objects are refused, naming the array's file.
def check_inputs(inputs: Sequence[InputSpec]) -> None:
    if not inputs:
        raise DataError("no input given (use --input PATH)")
    for spec in inputs:
        if not os.path.exists(spec.path):
            raise DataError("input file not found", path=spec.path)
        if spec.kind == "table":
            arrow_inputs.load(spec.path, spec.table)   # readable, with a unit column: before any output
            continue
        if not os.path.isfile(spec.path):
            raise DataError("input file not found", path=spec.path)
        if spec.kind == "npy" and not os.path.isfile(bounds_path(spec.path)):
            raise DataError(f"boundaries sidecar {bounds_path(spec.path)} not found", path=spec.path)
        if spec.kind == "npy":
            header = npy_header(spec.path)     # the array's dtype, before any record names the sidecar
            if header is not None and header[1].kind not in "iu":
                raise unit_dtype_error(header[1], spec.path)


# A chunk is (input index, first line number (1-based), payload): the payload is the list of raw lines
# (bytes; JSONL records or .bounds.jsonl lines, blank lines included so that numbering stays exact), or,
# for .npz, the number of records (line = record index + 1). Small, picklable, cheap to cut.
Chunk = Tuple[int, int, Union[List[bytes], int]]
# An item is one record: (input index, line number, raw line or None).
Item = Tuple[int, int, Optional[bytes]]


class LineText:
    """A chunk's lines as the one bytes object they were read as (a payload of ``iter_chunk_ranges``
    chunks once read): the vectorised paths read ``text`` whole, and only what needs line objects (the
    record path, the JSONL cutter) splits it, once (``lines``)."""

    __slots__ = ("text", "count", "_lines")

    def __init__(self, text: bytes, count: int):
        self.text, self.count, self._lines = text, count, None

    def lines(self) -> List[bytes]:
        if self._lines is None:
            self._lines = io.BytesIO(self.text).readlines()   # splits on b"\n" only, like iterating the file
        return self._lines

    def __len__(self) -> int:
        return self.count


def follows(bounds: str, line: int, start: int, prev_end: int, npy: str, allow_gaps: bool) -> None:
    """A record's range must start where the previous record's (in sidecar order) ends: at ``prev_end``,
    or after it with ``allow_gaps``. An overlap would write units twice; a gap would drop units silently."""
    if start < prev_end:
        raise FileError(f"{start} overlaps the previous record's range, which ends at {prev_end}; expected "
                        f"{'at least ' if allow_gaps else ''}{prev_end} (ranges follow the sidecar's order "
                        f"without overlapping)",
                        path=bounds, line=line, field="start")
    if start > prev_end and not allow_gaps:
        raise FileError(f"{start} leaves units [{prev_end}, {start}) of {npy} in no record; expected {prev_end} "
                        f"(--allow-gaps to skip units)", path=bounds, line=line, field="start")


def covers_to_end(bounds: str, line: Optional[int], end: Optional[int], units: int, npy: str) -> None:
    """The last record's range must end at the array's end (unless ``--allow-gaps``)."""
    if line is None:
        raise FileError(f"no record: units [0, {units}) of {npy} are in none; expected ranges covering them "
                        f"(--allow-gaps to skip units)", path=bounds)
    if end < units:
        raise FileError(f"{end} leaves units [{end}, {units}) of {npy} in no record; expected {units}, the end "
                        f"of {npy} (--allow-gaps to skip units)", path=bounds, line=line, field="end")


class BoundsCursor:
    """The record path's view of one chunk of a sidecar: each record's range checked against the one
    before it (``follows``), and the chunk's first start and last end kept for the build, which checks
    them against the neighbouring chunks (``span``). A record skipped with ``--skip-bad`` before its range
    was read makes the next record's start unknowable: it is not checked."""

    __slots__ = ("npy", "allow_gaps", "first_line", "first_start", "line", "end")

    def __init__(self, npy: str, allow_gaps: bool):
        self.npy, self.allow_gaps = npy, allow_gaps
        self.first_line = self.first_start = self.line = self.end = None

    def take(self, bounds: str, line: int, start: int, end: int) -> None:
        if self.line is None:
            self.first_line, self.first_start = line, start
        elif self.end is not None:
            follows(bounds, line, start, self.end, self.npy, self.allow_gaps)
        self.line, self.end = line, end

    def skipped(self, line: int) -> None:
        """Record ``line`` was quarantined: if before its range was taken, the range is unknown."""
        if self.line != line:
            if self.line is None:
                self.first_line = line
            self.line, self.end = line, None

    def span(self):
        """(first record's line, its start, last record's line, its end), None for unknown; None if no record."""
        return None if self.line is None else (self.first_line, self.first_start, self.line, self.end)


def _npz_chunks(fi: int, spec: InputSpec, chunk_size: int) -> Iterator[Chunk]:
    n = len(load_npz(spec.path)["offsets"]) - 1
    for a in range(0, n, chunk_size):
        yield fi, a + 1, min(chunk_size, n - a)


def _open_lines(spec: InputSpec):
    """The line file of an input (the JSONL itself, or an .npy's bounds sidecar), opened for reading."""
    path = bounds_path(spec.path) if spec.kind == "npy" else spec.path
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror})", path=path) from None


# The longest line (bytes, without its newline) a line input may hold: a longer one is refused, naming it,
# before it is read (``--max-line-bytes``). It bounds a build's memory: a chunk of a line file is at most this
# long (``iter_chunk_ranges``), however large the file. 256 MiB is ~50M units of one utterance or story.
MAX_LINE_BYTES = 256 << 20


def long_line_error(path: str, line: int, max_line_bytes: int) -> DataError:
    return FileError(f"line longer than {max_line_bytes:,} bytes; expected one JSON record per line, at most "
                     f"--max-line-bytes {max_line_bytes}", path=path, line=line)


def iter_chunks(inputs: Sequence[InputSpec], chunk_size: int,
                max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Chunk]:
    """Cut every input, in order, into chunks of ``chunk_size`` lines (read lazily: memory stays bounded;
    a chunk never spans two files; a line longer than ``max_line_bytes`` is refused before it is read
    whole). What ``iter_items`` reads; a build cuts with ``iter_chunk_ranges``."""
    limit = max_line_bytes + 2          # a longer read is a longer line, with or without its newline
    for fi, spec in enumerate(inputs):
        if spec.kind == "npz":
            yield from _npz_chunks(fi, spec, chunk_size)
            continue
        if spec.kind == "table":
            yield from arrow_inputs.chunks(fi, spec.path, spec.table, chunk_size)
            continue
        with _open_lines(spec) as f:
            first = 1
            readline = f.readline
            while True:
                lines = list(itertools.islice(iter(lambda: readline(limit), b""), chunk_size))
                if not lines:
                    break
                for k, text in enumerate(lines):
                    if len(text) > max_line_bytes and len(text) - text.endswith(b"\n") > max_line_bytes:
                        raise long_line_error(f.name, first + k, max_line_bytes)
                yield fi, first, lines
                first += len(lines)


BINARY_CHUNK_FACTOR = 16   # a pool's chunks of .npy/.npz inputs hold this many times chunk_size records
LINE_SAMPLE = 1 << 20      # iter_chunk_ranges: bytes read to estimate a line file's mean line length


def iter_chunk_ranges(inputs: Sequence[InputSpec], chunk_size: int, binary_factor: int = BINARY_CHUNK_FACTOR,
                      max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Chunk]:
    """The chunks a build converts: every line of every input once, in order, a line chunk given as (byte
    offset, byte count, line count) in its file instead of its lines (whoever converts the chunk -- the
    build's process or a pool worker -- reads it, as one bytes object). A line chunk is cut by size, not by
    counting lines: about ``chunk_size`` lines' worth of bytes (the mean line length from the file's first
    MiB), extended to the end of the line it stops in (``mmap.find``), and its lines are counted with one
    NumPy compare over its bytes. So the parent's work per chunk does not grow with the number of lines:
    finding every newline of a 258 MB JSONL took the parent 80 ms of a core the workers need; cutting by
    size takes about a tenth of that. The cut differs from ``iter_chunks`` (by line count); the output does
    not depend on how the input is cut. Chunks of .npy/.npz inputs hold ``binary_factor`` times more records
    (the default is a process pool's: converting 1,024 of their records takes about a millisecond, less than
    handing a chunk to a worker process and its result back).

    Bounded by ``max_line_bytes`` (M), however large the file or its lines: the step is at most M/2, and a
    line longer than the step (every line longer than M is: it holds the last byte of its chunk's step)
    gets a chunk of its own, after the lines before it -- so no chunk is longer than M + 1 bytes. That
    line's end is looked for no further than M bytes on; none there is a ``long_line_error`` naming the
    line, before anything has read it. The file's pages this process maps are dropped as each chunk is
    cut: its resident memory does not grow with the file either."""
    page = mmap.PAGESIZE
    drop = getattr(mmap, "MADV_DONTNEED", 0) if hasattr(mmap.mmap, "madvise") else 0
    for fi, spec in enumerate(inputs):
        size_of_chunk = chunk_size * (binary_factor if spec.kind in ("npy", "npz", "table") else 1)
        if spec.kind == "npz":
            yield from _npz_chunks(fi, spec, size_of_chunk)
            continue
        if spec.kind == "table":
            yield from arrow_inputs.chunks(fi, spec.path, spec.table, size_of_chunk)
            continue
        with _open_lines(spec) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = np.frombuffer(mm, dtype=np.uint8)
            try:
                sample = view[:LINE_SAMPLE]
                mean = sample.size / max(1, int(np.count_nonzero(sample == 10)))
                step = max(1, min(int(size_of_chunk * mean), max_line_bytes // 2))
                first, start, dropped = 1, 0, 0
                while start < size:
                    end = start + step
                    if end >= size:
                        end = size
                    else:
                        # the line holding byte end-1: [ls, its newline], at most max_line_bytes long
                        ls = mm.rfind(b"\n", start, end - 1)
                        ls = start if ls < 0 else ls + 1
                        nl = mm.find(b"\n", end - 1, min(size, ls + max_line_bytes + 1))
                        if nl < 0 and size - ls > max_line_bytes:
                            raise long_line_error(f.name, first + int(np.count_nonzero(view[start:ls] == 10)),
                                                  max_line_bytes)
                        end = size if nl < 0 else nl + 1
                        if end - ls > step and ls > start:
                            end = ls                     # a long line: its own chunk, next
                    lines = int(np.count_nonzero(view[start:end] == 10))
                    if end == size and view[size - 1] != 10:
                        lines += 1                       # the very last line may lack its newline
                    yield fi, first, (start, end - start, lines)
                    first += lines
                    start = end
                    cut = start - start % page
                    if cut - dropped >= 1 << 22 and drop:  # the pages read so far: out of this process's memory
                        mm.madvise(drop, dropped, cut - dropped)
                        dropped = cut
            finally:
                del view, sample
                mm.close()


def chunk_items(chunk: Chunk) -> Iterator[Item]:
    fi, first, payload = chunk
    if isinstance(payload, int):
        for i in range(payload):
            yield fi, first + i, None
        return
    if isinstance(payload, LineText):
        payload = payload.lines()
    for k, text in enumerate(payload):
        if text.strip():
            yield fi, first + k, text


def iter_items(inputs: Sequence[InputSpec], chunk_size: int = 4096) -> Iterator[Item]:
    """Every record of every input, in order."""
    for chunk in iter_chunks(inputs, chunk_size):
        yield from chunk_items(chunk)


# Fields each kind of line may carry; any other field is reported once per file (warning, see build).
UTT_FIELDS = frozenset({"file_name", "units", "duration", "lang", "id"})
AUDIO_REPR_FIELDS = frozenset({"file_name", "audio_repr", "lang", "id"})
BOUNDS_FIELDS = frozenset({"id", "start", "end", "lang"})


@dataclasses.dataclass
class Record:
    kind: str                                   # "utt" or "story"
    id: str
    lang: Optional[str] = None                  # utt
    units: Optional[np.ndarray] = None          # utt
    frames: int = 0                             # utt: source frames (hours); stories: per sentence
    sentences: Optional[Dict[str, List[np.ndarray]]] = None   # story
    unknown: FrozenSet[str] = frozenset()       # fields of the line that no format defines (ignored)


class _BeyondInt64(DataError):
    """A float where an integer belongs, which may be an integer literal beyond 64 bits: orjson reads
    those as floats (2**70 -> 1.1805916207174113e+21). ``parse_item`` then reads the line again with the
    standard library's exact integers, so that the error says what is wrong (out of range)."""


def _maybe_huge_int(v) -> bool:
    return type(v) is float and v.is_integer() and abs(v) >= 2 ** 63


def check_units(value, codebook_size: int, path: str, line: int, field: str) -> np.ndarray:
    """A JSON list (or array) of units -> int64 array; bad values name the element."""
    def bad(msg, f=field):
        return DataError(msg, path=path, line=line, field=f)

    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.kind not in "iu":
            raise bad(f"units must be integers, got dtype {arr.dtype}")
    else:
        if not isinstance(value, list):
            raise bad(f"expected a list of integer units, got {type(value).__name__}")
        if not value:
            raise bad("empty (no units)")
        arr = None
        try:
            arr = np.asarray(value)
        except (ValueError, OverflowError, TypeError):
            pass
        # JSON true/false are not units (np.asarray([True, 1]) would quietly make them 1/0)
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu" or \
                any(v is True or v is False for v in value):
            for i, v in enumerate(value):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise (_BeyondInt64 if _maybe_huge_int(v) else DataError)(
                        f"unit {v!r} is not an integer", path=path, line=line, field=f"{field}[{i}]")
            if arr is None or arr.dtype.kind not in "iu":   # ints too big for int64
                i = next(i for i, v in enumerate(value) if abs(v) >= 2 ** 63)
                raise bad(f"negative unit {value[i]}" if value[i] < 0 else
                          f"unit {value[i]} out of range [0, {codebook_size})", f"{field}[{i}]")
    if arr.size == 0:
        raise bad("empty (no units)")
    # checked in the array's own dtype, before the cast: a uint64 unit >= 2**63 is not negative
    neg = arr < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise bad(f"negative unit {int(arr[i])}", f"{field}[{i}]")
    big = arr >= codebook_size
    if big.any():
        i = int(np.argmax(big))
        raise bad(f"unit {int(arr[i])} out of range [0, {codebook_size})", f"{field}[{i}]")
    return arr.astype(np.int64, copy=False)


def _json_obj(text, path: str, line: int) -> dict:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if isinstance(text, bytes):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as u:
                raise DataError(f"invalid UTF-8 (byte 0x{text[u.start]:02x} at column {u.start + 1}); "
                                f"expected UTF-8 encoded JSON", path=path, line=line) from None
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=line) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    return obj


_AUDIO_REPR = re.compile(r"(?:<Un\d+>)+")
_UNIT_TOKEN = re.compile(r"<Un(\d+)>")


def audio_repr_units(value, codebook_size: int, path: str, line: int) -> np.ndarray:
    """slamkit's unit-tokeniser string ``"<Un12><Un907>..."`` -> units."""
    if not isinstance(value, str):
        raise DataError(f"expected a string of <UnN> unit tokens, got {type(value).__name__}", path=path,
                        line=line, field="audio_repr")
    if not value:
        raise DataError("empty (no units)", path=path, line=line, field="audio_repr")
    if not _AUDIO_REPR.fullmatch(value):
        pos = 0
        for m in _UNIT_TOKEN.finditer(value):
            if m.start() != pos:
                break
            pos = m.end()
        raise DataError(f"expected only <UnN> unit tokens (slamkit's unit tokeniser; text-interleaved lines are "
                        f"not supported), got {value[pos:pos + 20]!r} at character {pos}",
                        path=path, line=line, field="audio_repr")
    units = [int(m) for m in _UNIT_TOKEN.findall(value)]
    return check_units(units, codebook_size, path, line, "audio_repr")


def _check_lang(lang, languages, path, line, field="lang") -> str:
    if not isinstance(lang, str) or lang not in languages:
        raise DataError(f"unknown language {lang!r}; expected one of {list(languages)}",
                        path=path, line=line, field=field)
    return lang


def parse_item(spec: InputSpec, line: int, text: Optional[str], codebook_size: int,
               languages: Sequence[str], story_langs: Sequence[str], default_lang: str, bounds=None,
               partial: bool = False) -> Record:
    """One item -> a validated Record, or DataError naming file, line and field. ``bounds`` (a
    ``BoundsCursor``, .npy inputs): checks that the record's range follows the previous one's. ``partial``: a
    story may hold any non-empty subset of ``story_langs`` (``--langs`` / ``--pairs``), not all of them."""
    try:
        return _parse_item(spec, line, text, codebook_size, languages, story_langs, default_lang, bounds,
                           partial=partial)
    except _BeyondInt64 as e:
        # orjson made an integer of more than 64 bits a float: the exact integers decide the message
        import json
        try:
            obj = json.loads(text)
        except ValueError:
            raise DataError(e.reason, path=e.path, line=e.line, field=e.field) from None
        return _parse_item(spec, line, text, codebook_size, languages, story_langs, default_lang, bounds, obj=obj,
                           partial=partial)


def _parse_item(spec: InputSpec, line: int, text: Optional[str], codebook_size: int, languages: Sequence[str],
                story_langs: Sequence[str], default_lang: str, bounds=None, obj=None, partial: bool = False) -> Record:
    if spec.kind == "npz":
        d = load_npz(spec.path)
        a, b = int(d["offsets"][line - 1]), int(d["offsets"][line])
        units = check_units(d["units"][a:b], codebook_size, spec.path, line, "units")
        rid = str(d["ids"][line - 1]) if "ids" in d else f"{line - 1}"
        lang = str(d["langs"][line - 1]) if "langs" in d else default_lang
        lang = _check_lang(lang, languages, spec.path, line, "langs")
        return Record("utt", rid, lang=lang, units=units, frames=int(units.size))
    if spec.kind == "npy":
        bp = bounds_path(spec.path)
        if obj is None:
            obj = _json_obj(text, bp, line)
        arr = load_npy(spec.path)
        se = []
        for k in ("start", "end"):
            v = obj.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise (_BeyondInt64 if _maybe_huge_int(v) else DataError)(
                    f"expected an integer, got {v!r}", path=bp, line=line, field=k)
            se.append(v)
        a, b = se
        if not (0 <= a < b <= arr.shape[0]):
            raise DataError(f"bad boundaries [{a}, {b}) for {arr.shape[0]} units in {spec.path}; expected "
                            f"0 <= start < end <= {arr.shape[0]}", path=bp, line=line, field="end")
        if bounds is not None:
            bounds.take(bp, line, a, b)
        units = check_units(np.asarray(arr[a:b]), codebook_size, bp, line, "units")
        lang = _check_lang(obj.get("lang", default_lang), languages, bp, line)
        return Record("utt", str(obj.get("id", line)), lang=lang, units=units, frames=int(units.size),
                      unknown=frozenset(obj.keys() - BOUNDS_FIELDS))

    path = spec.path
    if spec.kind == "table" and obj is None:
        obj, column = arrow_inputs.row_object(path, spec.table, line)
        try:
            rec = _parse_item(spec, line, None, codebook_size, languages, story_langs, default_lang, obj=obj)
        except DataError as e:    # the table's own column name in the message, not the JSONL field's
            key, field = ("audio_repr" if "audio_repr" in obj else "units"), e.field
            if field is not None and field.startswith(key):
                field = column + field[len(key):]
            raise (DataError if isinstance(e, _BeyondInt64) else type(e))(e.reason, path=e.path, line=e.line,
                                                                           field=field) from None
        return dataclasses.replace(rec, unknown=arrow_inputs.load(path, spec.table).unknown)
    if obj is None:
        obj = _json_obj(text, path, line)
    if "audio_repr" in obj and "units" not in obj:
        units = audio_repr_units(obj["audio_repr"], codebook_size, path, line)
        lang = _check_lang(obj.get("lang", default_lang), languages, path, line)
        rid = obj.get("file_name", obj.get("id", f"line{line}"))
        return Record("utt", str(rid), lang=lang, units=units, frames=int(units.size),
                      unknown=frozenset(obj.keys() - AUDIO_REPR_FIELDS))
    if "units" in obj:
        units = check_units(obj["units"], codebook_size, path, line, "units")
        frames = int(units.size)
        dur = obj.get("duration")
        if dur is not None:
            if not isinstance(dur, list) or len(dur) != units.size or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in dur):
                raise DataError(f"expected {units.size} non-negative frame counts (one per unit)",
                                path=path, line=line, field="duration")
            frames = int(round(sum(dur)))
        lang = _check_lang(obj.get("lang", default_lang), languages, path, line)
        rid = obj.get("file_name", obj.get("id", f"line{line}"))
        return Record("utt", str(rid), lang=lang, units=units, frames=frames,
                      unknown=frozenset(obj.keys() - UTT_FIELDS))

    return _parse_story(obj, path, line, codebook_size, languages, story_langs, partial)


def _parse_story(obj, path: str, line: int, codebook_size: int, languages: Sequence[str],
                 story_langs: Sequence[str], partial: bool) -> Record:
    """A sentence-aligned story: every language it holds (all of ``story_langs``, or with ``partial`` a
    non-empty subset) with the same number of sentences."""
    if "id" not in obj:
        raise DataError("missing (a story needs an id; an utterance needs 'units')", path=path, line=line,
                        field="id")
    if partial:
        held = [l for l in story_langs if l in obj]
        if not held:
            raise DataError(f"a story holding none of the languages {list(story_langs)} of --langs / --pairs; "
                            f"expected at least one", path=path, line=line)
        story_langs = held
    sentences: Dict[str, List[np.ndarray]] = {}
    for lang in story_langs:
        if lang not in obj:
            raise DataError("missing (the list of this language's sentences)", path=path, line=line, field=lang)
        sl = obj[lang]
        if not isinstance(sl, list):
            raise DataError(f"expected a list of sentences, got {type(sl).__name__}", path=path, line=line,
                            field=lang)
        if not sl:
            raise DataError("empty story (no sentences)", path=path, line=line, field=lang)
        sentences[lang] = [check_units(s, codebook_size, path, line, f"{lang}[{i}]") for i, s in enumerate(sl)]
    first = story_langs[0]
    for lang in story_langs[1:]:
        if len(sentences[lang]) != len(sentences[first]):
            raise DataError(f"{len(sentences[lang])} sentences but '{first}' has {len(sentences[first])}",
                            path=path, line=line, field=lang)
    return Record("story", str(obj["id"]), sentences=sentences,
                  unknown=frozenset(obj.keys() - {"id"} - set(languages)))
