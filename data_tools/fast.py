"""Vectorised chunk conversion for utterance records (JSONL ``units`` / ``audio_repr`` lines, .npy + bounds,
.npz): a whole chunk becomes one token array, one language array and the document lengths with a few
NumPy operations, with no Python loop per unit (and, for .npy/.npz, none per record either).

Every function here returns ``None`` when it cannot vouch for the chunk (anything unusual: a story line,
a value that is not a plain non-negative integer, a unit out of range, invalid JSON, ...). The caller then
converts the chunk record by record through ``formats.parse_item`` + ``streams.record_documents``, which
gives the exact error (file:line:field) or the quarantine entry. For valid input both paths produce the
same bytes (tests/data_tools/test_fast_path.py checks it), so the fast path never changes a dataset.

Why hand-written: megatron-core's builder takes one tensor per item, and JSON libraries build one Python
int per unit; both cost far more than the data (issue 14 item 4).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from megaslm.vocab import LANG_NONE

from data_tools.formats import AUDIO_REPR_FIELDS, BOUNDS_FIELDS, UTT_FIELDS, _load_npy, _load_npz, bounds_path
from data_tools.streams import BuildOptions, Stats

_CLASSES = bytes(48 if 48 <= c <= 57 else c if c in b", /" else ord("x") for c in range(256))


def parse_int_lists(bodies: Sequence[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The texts of JSON integer arrays without brackets (``b"12, 907, 3"``) -> (all values as one int64
    array, the count per body), or None unless every body is a non-empty list of plain JSON integers below
    ``limit`` (digits only: no sign, fraction, exponent, leading zero or empty element; spaces allowed).

    How: the bodies are joined with '/', spaces dropped (``bytes.translate``), and each number is read
    from a fixed-width window ending at its separator (``sliding_window_view``): W digit columns times
    powers of ten, W = the digits of ``limit - 1``. A longer number cannot be a valid unit anyway."""
    m = len(bodies)
    if not m:
        return None
    buf = b"/".join(bodies)
    classes = buf.translate(_CLASSES)               # digits -> '0', ',' ' ' '/' kept, anything else -> 'x'
    if b"x" in classes or b"0 " in classes:
        return None                                  # a sign, '.', 'e', quote, tab...; or a space after a digit
    if classes.count(b"/") != m - 1:                 # ("1 2" is not 12; the rare valid "1 ,2" takes the
        return None                                  #  record path) ; a '/' inside a body
    tight = buf.translate(None, b" ") if b" " in buf else buf
    t = np.frombuffer(tight, dtype=np.uint8)
    sep = np.flatnonzero(t < 48)                     # ',' and '/' end a number
    n = sep.size + 1
    ends = np.empty(n, dtype=np.int64)
    ends[:-1] = sep
    ends[-1] = t.size
    lens = np.diff(ends, prepend=-1) - 1
    W = len(str(max(int(limit) - 1, 1)))
    if int(lens.min()) < 1 or int(lens.max()) > W:
        return None                                  # an empty element, or a number too long to be a unit
    multi = lens > 1
    if np.any(t[ends[multi] - lens[multi]] == 48):
        return None                                  # a leading zero ("012" is not JSON)
    padded = np.empty(t.size + W, dtype=np.uint8)    # W '0's in front: every number has W bytes before its end
    padded[:W] = 48
    padded[W:] = t
    last = ends + (W - 1)                            # the last digit of each number, in padded
    acc = np.int64 if W > 9 else np.int32
    values = padded[last].astype(acc)
    values -= 48
    for k in range(1, W):                            # the digit of 10**k, present in numbers longer than k
        d = padded[last - k]
        d -= 48
        d *= lens > k
        values += d.astype(acc) * acc(10 ** k)
    values = values.astype(np.int64)
    body_end = np.empty(m, dtype=np.int64)           # index (in numbers) of the last number of each body
    body_end[:-1] = np.flatnonzero(t[sep] == 47)
    body_end[-1] = n - 1
    counts = np.diff(body_end, prepend=-1)
    return values, counts


def assemble(units: np.ndarray, counts: np.ndarray, lang_ids: np.ndarray, frames: np.ndarray,
             source: str, opts: BuildOptions, dtype, lang_names: Sequence[str]):
    """Validated units of consecutive utterances -> (tokens, languages, document lengths, Stats), exactly as
    ``streams.record_documents`` lays out one utterance per document ([bos] units eod)."""
    vocab = opts.vocab
    n = counts.size
    units_in = int(units.size)
    if vocab.dedup and units.size > 1:
        keep = np.empty(units.size, dtype=bool)
        keep[0] = True
        np.not_equal(units[1:], units[:-1], out=keep[1:])
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        keep[starts] = True                          # a record's first unit is always kept
        csum = np.cumsum(keep, dtype=np.int64)
        ends = csum[starts + counts - 1]
        counts = np.diff(np.concatenate(([0], ends)))
        units = units[keep]
    extra = 2 if opts.add_bos else 1
    lengths = counts + extra
    total = int(lengths.sum())
    doc_end = np.cumsum(lengths) - 1                 # eod positions
    tokens = np.empty(total, dtype=dtype)
    special = np.zeros(total, dtype=bool)
    special[doc_end] = True
    if opts.add_bos:
        special[doc_end - lengths + 1] = True
    body = units.astype(dtype)                        # units < codebook: offset + unit fits the token dtype
    body += vocab.offset
    tokens[~special] = body
    tokens[doc_end] = vocab.eod_id
    if opts.add_bos:
        tokens[doc_end - lengths + 1] = vocab.bos_id
    langs = np.repeat(lang_ids.astype(np.uint8), lengths)
    langs[special] = LANG_NONE
    st = Stats(tokens=total, documents=n, sentences=n, units_in=units_in)
    per_lang = np.bincount(lang_ids, weights=counts, minlength=len(lang_names) + 1)
    per_frames = np.bincount(lang_ids, weights=frames, minlength=len(lang_names) + 1)
    present = np.bincount(lang_ids, minlength=len(lang_names) + 1)
    for i, name in enumerate(lang_names, 1):
        if present[i]:
            st.per_language[name] = int(per_lang[i])
            st.frames[name] = int(per_frames[i])
    st.per_language["none"] = n * extra
    st.per_source[source] = total
    return tokens, langs, lengths, st


def _lang_table(opts: BuildOptions) -> Dict[str, int]:
    return {name: opts.vocab.lang_id(name) for name in opts.vocab.languages}


def _check_range(units: np.ndarray, codebook_size: int) -> bool:
    return units.size > 0 and units.dtype.kind in "iu" and int(units.min()) >= 0 and \
        int(units.max()) < codebook_size


def jsonl_chunk(lines: List[bytes], source: str, opts: BuildOptions, dtype):
    """Utterance JSONL lines (``units`` or slamkit ``audio_repr``) -> assemble(...) + unknown field names,
    or None (see module doc)."""
    bodies: List[bytes] = []
    rests: List[bytes] = []
    kinds: List[bool] = []                           # True: units, False: audio_repr
    for text in lines:
        i = text.find(b'"units"')
        if i >= 0:
            a = text.find(b"[", i + 7)
            b = text.find(b"]", a + 1)
            if a < 0 or b < 0 or text[i + 7:a].strip() != b":":
                return None
            bodies.append(text[a + 1:b])
            rests.append(text[:a] + b"[]" + text[b + 1:])
            kinds.append(True)
            continue
        i = text.find(b'"audio_repr"')
        if i >= 0:
            a = text.find(b'"', i + 12)
            b = text.find(b'"', a + 1)
            if a < 0 or b < 0 or text[i + 12:a].strip() != b":":
                return None
            v = text[a + 1:b]
            if not (v.startswith(b"<Un") and v.endswith(b">")) or b"\\" in v:
                return None
            bodies.append(v[3:-1].replace(b"><Un", b","))
            rests.append(text[:a] + b'""' + text[b + 1:])
            kinds.append(False)
            continue
        if text.strip():
            return None                              # a story or something else: the record path
    if not bodies:
        return None
    try:
        objs = orjson.loads(b"[" + b",".join(rests) + b"]")
    except orjson.JSONDecodeError:
        return None
    parsed = parse_int_lists(bodies, opts.vocab.codebook_size)
    if parsed is None:
        return None
    units, counts = parsed
    if not _check_range(units, opts.vocab.codebook_size):
        return None
    table = _lang_table(opts)
    default = table[opts.lang]
    lang_ids = np.empty(len(objs), dtype=np.uint8)
    frames = counts.copy()
    unknown = set()
    for k, (o, is_units) in enumerate(zip(objs, kinds)):
        if type(o) is not dict:
            return None
        if is_units:
            # the placeholder must be the value we cut out (else "units" sat inside a string)
            if o.get("units") != []:
                return None
            if not UTT_FIELDS.issuperset(o):
                unknown.update(o.keys() - UTT_FIELDS)
            dur = o.get("duration")
            if dur is not None:
                if type(dur) is not list or len(dur) != counts[k] or not all(
                        (type(x) is int or type(x) is float) and x >= 0 for x in dur):
                    return None
                frames[k] = int(round(sum(dur)))
        else:
            if o.get("audio_repr") != "" or "units" in o:
                return None
            if not AUDIO_REPR_FIELDS.issuperset(o):
                unknown.update(o.keys() - AUDIO_REPR_FIELDS)
        if "lang" not in o:
            lang_ids[k] = default
        else:
            lang = o["lang"]
            lid = table.get(lang) if type(lang) is str else None
            if lid is None:
                return None
            lang_ids[k] = lid
    return assemble(units, counts, lang_ids, frames, source, opts, dtype, opts.vocab.languages) + (unknown,)


def npy_chunk(path: str, lines: List[bytes], source: str, opts: BuildOptions, dtype):
    """.bounds.jsonl lines of ``path`` -> assemble(...) + unknown field names, or None."""
    body = [t for t in lines if t.strip()]
    if not body:
        return None
    try:
        objs = orjson.loads(b"[" + b",".join(body) + b"]")
    except orjson.JSONDecodeError:
        return None
    if not all(type(o) is dict for o in objs):
        return None
    st = [o.get("start") for o in objs]
    en = [o.get("end") for o in objs]
    if set(map(type, st)) != {int} or set(map(type, en)) != {int}:     # C-level type check (no bools)
        return None
    arr = _load_npy(path)
    a = np.array(st, dtype=np.int64)
    b = np.array(en, dtype=np.int64)
    if np.any(a < 0) or np.any(b <= a) or np.any(b > arr.shape[0]):
        return None
    table = _lang_table(opts)
    langs = [o.get("lang", opts.lang) for o in objs]
    kinds = set(langs)
    if not all(type(l) is str and l in table for l in kinds):
        return None
    if len(kinds) == 1:
        lang_ids = np.full(len(objs), table[langs[0]], dtype=np.uint8)
    else:
        lang_ids = np.fromiter(map(table.__getitem__, langs), dtype=np.uint8, count=len(langs))
    keys = set()
    keys.update(*objs)
    unknown = keys - BOUNDS_FIELDS
    units = _gather(arr, a, b)
    if units is None or not _check_range(units, opts.vocab.codebook_size):
        return None
    counts = b - a
    return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (unknown,)


def _gather(arr: np.ndarray, a: np.ndarray, b: np.ndarray) -> Optional[np.ndarray]:
    """arr[a0:b0] ++ arr[a1:b1] ++ ...: one slice when the ranges are contiguous (the usual layout)."""
    if arr.dtype.kind not in "iu":
        return None
    if a.size == 1 or np.array_equal(a[1:], b[:-1]):
        return np.asarray(arr[a[0]:b[-1]])
    counts = b - a
    starts = np.zeros(a.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    idx = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(a - starts, counts)
    return np.asarray(arr[idx])


def npz_chunk(path: str, first: int, count: int, source: str, opts: BuildOptions, dtype):
    """Records first..first+count-1 (1-based) of an .npz -> assemble(...) + no unknown fields, or None."""
    d = _load_npz(path)
    off = d["offsets"][first - 1:first + count].astype(np.int64)
    a, b = off[:-1], off[1:]
    if np.any(b <= a):
        return None                                  # an empty record: the record path names it
    table = _lang_table(opts)
    if "langs" in d:
        names, inv = np.unique(d["langs"][first - 1:first - 1 + count], return_inverse=True)
        try:
            ids = np.array([table[str(x)] for x in names], dtype=np.uint8)
        except KeyError:
            return None
        lang_ids = ids[inv.reshape(-1)]
    else:
        lang_ids = np.full(count, table[opts.lang], dtype=np.uint8)
    units = _gather(d["units"], a, b)
    if units is None or not _check_range(units, opts.vocab.codebook_size):
        return None
    counts = b - a
    return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (set(),)


__all__ = ["parse_int_lists", "assemble", "jsonl_chunk", "npy_chunk", "npz_chunk", "bounds_path"]
