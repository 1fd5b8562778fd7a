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

def parse_int_lists(bodies: Sequence[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The texts of JSON integer arrays without brackets (``b"12, 907, 3"``) -> (all values as one int64
    array, the count per body), or None unless every body is a non-empty list of plain JSON integers below
    ``limit`` (digits only: no sign, fraction, exponent, leading zero or empty element; spaces allowed
    before a number, not after one -- the rare valid ``"1 ,2"`` goes to the record path).

    How: the bodies are joined with '/', and every step is a whole-buffer NumPy operation (SIMD byte
    compares, no per-byte Python and no bytes methods, which are ~50x slower here): separators are the ','
    and '/' bytes, a number's last digit sits just before its separator, and its value is read from the W
    bytes before that (W = the digits of ``limit - 1``; a longer number cannot be a unit anyway)."""
    m = len(bodies)
    if not m:
        return None
    raw = np.frombuffer(b"/".join(bodies), dtype=np.uint8)
    size = raw.size
    if size == 0:
        return None
    isd = (raw - np.uint8(48)) < 10                  # uint8 arithmetic wraps: only '0'..'9' are < 10
    issep = (raw == 44) | (raw == 47)
    issp = raw == 32
    if np.count_nonzero(isd) + np.count_nonzero(issep) + np.count_nonzero(issp) != size:
        return None                                  # any other byte: sign, '.', 'e', quote, tab, ...
    if np.any(issp[1:] & isd[:-1]):
        return None                                  # a space after a digit ("1 2" is not 12)
    sep = np.flatnonzero(issep)
    n = sep.size + 1
    last = np.empty(n, dtype=np.int64)               # each number's last digit
    last[:-1] = sep - 1
    last[-1] = size - 1
    if last[0] < 0 or not np.all(isd[last]):
        return None                                  # an empty element: ",,", ", ,", a leading/trailing ','
    if np.count_nonzero(raw[sep] == 47) != m - 1:
        return None                                  # a '/' inside a body
    W = len(str(max(int(limit) - 1, 1)))
    pad = np.zeros(size + W + 1, dtype=np.uint8)     # W+1 non-digits in front: every number has W bytes before
    pad[W + 1:] = raw
    dpad = np.zeros(size + W + 1, dtype=bool)
    dpad[W + 1:] = isd
    pos = last + (W + 1)
    acc = np.int64 if W > 9 else np.int32
    values = pad[pos].astype(acc)
    values -= 48
    present = np.ones(n, dtype=bool)
    length = np.ones(n, dtype=np.int64)
    for k in range(1, W):                            # the digit of 10**k, if the number has more than k digits
        present &= dpad[pos - k]
        d = pad[pos - k] - np.uint8(48)
        d *= present
        values += d.astype(acc) * acc(10 ** k)
        length += present
    if np.any(present & dpad[pos - W]):
        return None                                  # more than W digits: not a unit of this codebook
    if np.any((length > 1) & (pad[pos - length + 1] == 48)):
        return None                                  # a leading zero ("012" is not JSON)
    body_end = np.empty(m, dtype=np.int64)           # index (in numbers) of the last number of each body
    body_end[:-1] = np.flatnonzero(raw[sep] == 47)
    body_end[-1] = n - 1
    counts = np.diff(body_end, prepend=-1)
    return values.astype(np.int64), counts


def assemble(units: np.ndarray, counts: np.ndarray, lang_ids: np.ndarray, frames: np.ndarray,
             source: str, opts: BuildOptions, dtype, lang_names: Sequence[str]):
    """Validated units of consecutive utterances -> (tokens, languages, document lengths, Stats), exactly as
    ``streams.record_documents`` lays out one utterance per document: [bos] [language tag] units eod (the
    tag when ``vocab.lang_tags``: an utterance is one sentence, so it always opens with its tag; a separator
    never appears, since it sits only between sentences)."""
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
    head = (1 if opts.add_bos else 0) + (1 if vocab.lang_tags else 0)   # specials before the units
    extra = head + 1
    lengths = counts + extra
    total = int(lengths.sum())
    doc_end = np.cumsum(lengths) - 1                 # eod positions
    doc_start = doc_end - lengths + 1
    tokens = np.empty(total, dtype=dtype)
    langs = np.empty(total, dtype=np.uint8)
    # unit j of the chunk, in document k, lands at j + k * extra + head: one scatter, no loop per document
    dest = np.arange(units.size, dtype=np.int64)
    dest += np.repeat(np.arange(n, dtype=np.int64) * extra + head, counts)
    body = units.astype(dtype)                        # units < codebook: offset + unit fits the token dtype
    body += vocab.offset
    tokens[dest] = body
    langs[dest] = np.repeat(lang_ids.astype(np.uint8), counts)
    tokens[doc_end] = vocab.eod_id
    langs[doc_end] = LANG_NONE
    if opts.add_bos:
        tokens[doc_start] = vocab.bos_id
        langs[doc_start] = LANG_NONE
    if vocab.lang_tags:
        tag_of = np.zeros(len(lang_names) + 1, dtype=np.int64)
        for name in lang_names:
            tag_of[vocab.lang_id(name)] = vocab.lang_tag_id(name)
        at = doc_start + (1 if opts.add_bos else 0)
        tokens[at] = tag_of[lang_ids]
        langs[at] = LANG_NONE
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
            if a < 0 or b < 0:
                return None
            # no check here that this '[' opens the value of "units": the parsed rest must show the
            # placeholder [] as that value, which fails otherwise
            bodies.append(text[a + 1:b])
            rests.append(text[:a] + b"[]" + text[b + 1:])
            kinds.append(True)
            continue
        i = text.find(b'"audio_repr"')
        if i >= 0:
            a = text.find(b'"', i + 12)
            b = text.find(b'"', a + 1)
            if a < 0 or b < 0:
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
