"""Input formats, read as a stream of small items and parsed/validated one record at a time.

Formats (docs/data_tools.md has an example of each):

* ``jsonl`` -- one JSON object per line, either
  - an utterance (slamkit features): ``{"file_name": "a.flac", "units": [...], "duration": [...], "lang": "en"}``
    (``duration`` and ``lang`` optional; ``duration`` = frames per unit, used for hours), or
  - a sentence-aligned story: ``{"id": "s0", "en": [[...], [...]], "fr": [[...], [...]]}``
    (one list of units per sentence, the same number of sentences in every language).
* ``npy`` -- ``X.npy``: a 1-D integer array of all units concatenated, with the sidecar
  ``X.bounds.jsonl``: one line per utterance ``{"id": "u0", "start": 0, "end": 412, "lang": "en"}``;
  or ``X.npz`` with arrays ``units`` (1-D) and ``offsets`` (N+1 cumulative boundaries), optional
  ``ids`` and ``langs`` (N strings).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.errors import DataError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    path: str
    source: str          # name used for per-source token counts

    @classmethod
    def parse(cls, spec: str) -> "InputSpec":
        """``PATH`` or ``NAME=PATH`` (the source name defaults to the file's stem)."""
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            path, name = spec, ""
        if not name:
            base = os.path.basename(path)
            for ext in (".jsonl", ".json", ".npy", ".npz"):
                if base.endswith(ext):
                    base = base[: -len(ext)]
            name = base
        return cls(path=path, source=name)

    @property
    def kind(self) -> str:
        if self.path.endswith(".npz"):
            return "npz"
        if self.path.endswith(".npy"):
            return "npy"
        return "jsonl"


def bounds_path(npy_path: str) -> str:
    return npy_path[: -len(".npy")] + ".bounds.jsonl"


def check_inputs(inputs: Sequence[InputSpec]) -> None:
    if not inputs:
        raise DataError("no input given (use --input PATH)")
    for spec in inputs:
        if not os.path.isfile(spec.path):
            raise DataError("input file not found", path=spec.path)
        if spec.kind == "npy" and not os.path.isfile(bounds_path(spec.path)):
            raise DataError(f"boundaries sidecar {bounds_path(spec.path)} not found", path=spec.path)


# An item is (input index, line number (1-based), text or None): small and picklable.
Item = Tuple[int, int, Optional[str]]


def iter_items(inputs: Sequence[InputSpec]) -> Iterator[Item]:
    """Stream the items of every input in order (lines are read lazily: memory stays bounded)."""
    for fi, spec in enumerate(inputs):
        if spec.kind == "npz":
            n = len(_load_npz(spec.path)["offsets"]) - 1
            for i in range(n):
                yield fi, i + 1, None
            continue
        path = bounds_path(spec.path) if spec.kind == "npy" else spec.path
        with open(path, "r", encoding="utf-8") as f:
            for ln, text in enumerate(f, 1):
                if text.strip():
                    yield fi, ln, text


def iter_chunks(items: Iterator[Item], chunk_size: int) -> Iterator[List[Item]]:
    chunk: List[Item] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclasses.dataclass
class Record:
    kind: str                                   # "utt" or "story"
    id: str
    lang: Optional[str] = None                  # utt
    units: Optional[np.ndarray] = None          # utt
    frames: int = 0                             # utt: source frames (hours); stories: per sentence
    sentences: Optional[Dict[str, List[np.ndarray]]] = None   # story


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
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
            for i, v in enumerate(value):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise bad(f"unit {v!r} is not an integer", f"{field}[{i}]")
            if arr is None or arr.dtype.kind not in "iu":   # ints too big for int64
                i = next(i for i, v in enumerate(value) if abs(v) >= 2 ** 63)
                raise bad(f"unit {value[i]} out of range [0, {codebook_size})", f"{field}[{i}]")
    if arr.size == 0:
        raise bad("empty (no units)")
    arr = arr.astype(np.int64, copy=False)
    neg = arr < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise bad(f"negative unit {int(arr[i])}", f"{field}[{i}]")
    big = arr >= codebook_size
    if big.any():
        i = int(np.argmax(big))
        raise bad(f"unit {int(arr[i])} out of range [0, {codebook_size})", f"{field}[{i}]")
    return arr


def _json_obj(text: str, path: str, line: int) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=line) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    return obj


def _check_lang(lang, languages, path, line, field="lang") -> str:
    if not isinstance(lang, str) or lang not in languages:
        raise DataError(f"unknown language {lang!r}; expected one of {list(languages)}",
                        path=path, line=line, field=field)
    return lang


_NPZ_CACHE: Dict[str, dict] = {}
_NPY_CACHE: Dict[str, np.ndarray] = {}


def _load_npz(path: str) -> dict:
    if path not in _NPZ_CACHE:
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - any unreadable archive
            raise DataError(f"cannot read .npz ({e})", path=path) from None
        for k in ("units", "offsets"):
            if k not in d:
                raise DataError("array missing", path=path, field=k)
        off = d["offsets"]
        if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 2 or off[0] != 0 \
                or np.any(np.diff(off) < 0) or off[-1] != len(d["units"]):
            raise DataError("expected N+1 non-decreasing boundaries from 0 to len(units)", path=path,
                            field="offsets")
        _NPZ_CACHE.clear()
        _NPZ_CACHE[path] = d
    return _NPZ_CACHE[path]


def _load_npy(path: str) -> np.ndarray:
    if path not in _NPY_CACHE:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read .npy ({e})", path=path) from None
        if arr.ndim != 1:
            raise DataError(f"expected a 1-D unit array, got shape {arr.shape}", path=path, field="units")
        _NPY_CACHE.clear()
        _NPY_CACHE[path] = arr
    return _NPY_CACHE[path]


def parse_item(spec: InputSpec, line: int, text: Optional[str], codebook_size: int,
               languages: Sequence[str], story_langs: Sequence[str], default_lang: str) -> Record:
    """One item -> a validated Record, or DataError naming file, line and field."""
    if spec.kind == "npz":
        d = _load_npz(spec.path)
        a, b = int(d["offsets"][line - 1]), int(d["offsets"][line])
        units = check_units(d["units"][a:b], codebook_size, spec.path, line, "units")
        rid = str(d["ids"][line - 1]) if "ids" in d else f"{line - 1}"
        lang = str(d["langs"][line - 1]) if "langs" in d else default_lang
        lang = _check_lang(lang, languages, spec.path, line, "langs")
        return Record("utt", rid, lang=lang, units=units, frames=int(units.size))
    if spec.kind == "npy":
        bp = bounds_path(spec.path)
        obj = _json_obj(text, bp, line)
        arr = _load_npy(spec.path)
        se = []
        for k in ("start", "end"):
            v = obj.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise DataError(f"expected an integer, got {v!r}", path=bp, line=line, field=k)
            se.append(v)
        a, b = se
        if not (0 <= a < b <= arr.shape[0]):
            raise DataError(f"bad boundaries [{a}, {b}) for {arr.shape[0]} units in {spec.path}",
                            path=bp, line=line, field="end")
        units = check_units(np.asarray(arr[a:b]), codebook_size, bp, line, "units")
        lang = _check_lang(obj.get("lang", default_lang), languages, bp, line)
        return Record("utt", str(obj.get("id", line)), lang=lang, units=units, frames=int(units.size))

    path = spec.path
    obj = _json_obj(text, path, line)
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
        return Record("utt", str(rid), lang=lang, units=units, frames=frames)

    # a story
    if "id" not in obj:
        raise DataError("missing (a story needs an id; an utterance needs 'units')", path=path, line=line,
                        field="id")
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
    return Record("story", str(obj["id"]), sentences=sentences)
