"""Vectorised chunk conversion for utterance records, per input format (JSONL ``units`` / ``audio_repr``
lines, .npy + .bounds.jsonl, .npz): a whole chunk becomes one token array, one language array and the
document lengths with a few NumPy operations, with no Python loop per unit (and, for .npy/.npz, none per
record either). The format-agnostic parts live beside it: ``data_tools.intparse`` (integers out of text)
and ``data_tools.templates`` (JSON lines read by their layouts).

Every function here returns ``None`` when it cannot vouch for the chunk (anything unusual: a story line,
a value that is not a plain non-negative integer, a unit out of range, invalid JSON, ...). The caller then
converts the chunk record by record through ``formats.parse_item`` + ``streams.record_documents``, which
gives the exact error (file:line:field) or the quarantine entry. For valid input both paths produce the
same bytes (tests/data_tools/test_fast_path.py checks it), so the fast path never changes a dataset.

Why hand-written: megatron-core's builder takes one tensor per item, and JSON libraries build one Python
int per unit; both cost far more than the data (issue 14 item 4).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import numpy as np
import orjson

from megaslm.vocab import LANG_NONE

from data_tools import arrow_inputs
from data_tools.arrays import load_npy, load_npz
from data_tools.formats import AUDIO_REPR_FIELDS, BOUNDS_FIELDS, UTT_FIELDS, LineText, bounds_path
from data_tools.intparse import parse_in_batches
from data_tools.streams import BuildOptions, Stats
from data_tools.templates import template_lines

def assemble(units: np.ndarray, counts: np.ndarray, lang_ids: np.ndarray, frames: np.ndarray,
             source: str, opts: BuildOptions, dtype, lang_names: Sequence[str]):
    """Validated units of consecutive utterances, already as tokens (``token_body``: unit + vocab.offset,
    in the token dtype) -> (tokens, languages, document lengths, Stats), exactly as
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
    is_unit = np.ones(total, dtype=bool)              # False at the eod, bos and tag positions
    is_unit[doc_end] = False
    for k in range(head):
        is_unit[doc_start + k] = False
    tokens = np.empty(total, dtype=dtype)
    tokens[is_unit] = units                            # the units, in order, around the specials
    single = n == 0 or lang_ids.min() == lang_ids.max()
    if single:                                        # one language in the chunk (mono): one fill
        langs = np.full(total, lang_ids[0] if n else LANG_NONE, dtype=np.uint8)
    else:
        langs = np.repeat(lang_ids.astype(np.uint8), lengths)
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


RANGE_BLOCK = 1 << 17      # token_body: units per block (1 MiB of int64, which stays in L2 until cast)


def token_body(units: np.ndarray, opts: BuildOptions, dtype) -> Optional[np.ndarray]:
    """Units -> their tokens (unit + vocab.offset) in the token dtype, or None unless 0 <= every unit <
    codebook_size. Checked and cast block by block: a block the range check has just read is still in the
    core's cache when the cast reads it (one pass over memory, not two; ~1 ms less on 4.5M int64 units).
    As unsigned integers, negative units are huge, so one ``max`` checks both bounds -- as long as the
    codebook lies below the unsigned view of -1's upper half (2**(bits-1)): an int8 unit -5 reads 251,
    under a 2048 codebook. Signed units that narrow (int8 over 128 units, int16 over 32768) are checked
    in their own signedness instead: every non-negative value is then below the codebook, so their
    ``min`` is the whole check."""
    if units.size == 0 or units.dtype.kind not in "iu":
        return None
    u = units.view(units.dtype.str.replace("i", "u"))
    limit = opts.vocab.codebook_size
    by_sign = units.dtype.kind == "i" and limit > 1 << (8 * units.dtype.itemsize - 1)
    out = np.empty(u.size, dtype=dtype)
    for s in range(0, u.size, RANGE_BLOCK):
        blk = u[s:s + RANGE_BLOCK]
        if int(units[s:s + RANGE_BLOCK].min()) < 0 if by_sign else int(blk.max()) >= limit:
            return None
        np.copyto(out[s:s + RANGE_BLOCK], blk, casting="unsafe")   # < codebook_size: fits the token dtype
    out += np.dtype(dtype).type(opts.vocab.offset)
    return out


def _utterance_layouts(rests: List[bytes], table: Dict[str, int], default: str):
    """The ``units`` lines of a chunk with their unit lists cut out (``"units": []``), read by their few
    layouts (``template_lines``): (language id of each line, unknown field names), or None (a line with
    ``duration``, or in too many layouts: then orjson reads them, one dict each)."""
    got = _layouts(b"".join(rests), (), ("units", "lang"))
    if got is None or got[1].size != len(rests):
        return None
    templates, _, tmpl_of, _ = got
    # the placeholder must be the value we cut out (else "units" sat inside a string)
    if any(t.obj is None or t.obj.get("units") != [] or "duration" in t.obj for t in templates):
        return None
    got = _layout_langs(templates, table, default)
    if got is None:
        return None
    ids, keys = got
    return ids[tmpl_of], keys - UTT_FIELDS


def jsonl_chunk(lines, source: str, opts: BuildOptions, dtype):
    """Utterance JSONL lines (``units`` or slamkit ``audio_repr``; a formats.LineText, or a list of lines)
    -> assemble(...) + unknown field names, or None (see module doc).

    The lines are cut in the chunk's one bytes object, by position (``bytes.find`` within each line), so
    no line object is made: reading a chunk as 1,024 line objects cost ~13% of a JSONL build."""
    cut = _cut_unit_lists(lines.text if isinstance(lines, LineText) else b"".join(lines))
    if cut is None:
        return None
    bodies, rests, kinds = cut
    table = _lang_table(opts)
    by_layout = _utterance_layouts(rests, table, opts.lang) if all(kinds) else None
    if by_layout is None:
        try:
            objs = orjson.loads(b"[" + b",".join(rests) + b"]")
        except orjson.JSONDecodeError:
            return None
    parsed = parse_in_batches(bodies, opts.vocab.codebook_size)
    if parsed is None:
        return None
    units, counts = parsed
    units = token_body(units, opts, dtype)
    if units is None:
        return None
    if by_layout is not None:
        (lang_ids, unknown), frames = by_layout, counts
    else:
        fields = _utterance_fields(objs, kinds, counts, table, table[opts.lang])
        if fields is None:
            return None
        lang_ids, frames, unknown = fields
    return assemble(units, counts, lang_ids, frames, source, opts, dtype, opts.vocab.languages) + (unknown,)


def _cut_unit_lists(text: bytes):
    """A chunk's lines -> (the text of each line's unit list, the line with that list cut out (``"units":
    []`` / ``"audio_repr": ""``), whether it was a ``units`` line), or None if a non-blank line holds neither
    (a story or something else: the record path) or there is no line at all."""
    bodies: List[bytes] = []
    rests: List[bytes] = []
    kinds: List[bool] = []                           # True: units, False: audio_repr
    find = text.find
    pos, size = 0, len(text)
    while pos < size:
        nl = find(b"\n", pos)
        stop = size if nl < 0 else nl + 1            # this line is text[pos:stop]
        i = find(b'"units"', pos, stop)
        if i >= 0:
            a = find(b"[", i + 7, stop)
            b = find(b"]", a + 1, stop)
            if a < 0 or b < 0:
                return None
            # no check here that this '[' opens the value of "units": the parsed rest must show the
            # placeholder [] as that value, which fails otherwise
            bodies.append(text[a + 1:b])
            rests.append(text[pos:a] + b"[]" + text[b + 1:stop])
            kinds.append(True)
            pos = stop
            continue
        i = find(b'"audio_repr"', pos, stop)
        if i >= 0:
            a = find(b'"', i + 12, stop)
            b = find(b'"', a + 1, stop)
            if a < 0 or b < 0:
                return None
            v = text[a + 1:b]
            if not (v.startswith(b"<Un") and v.endswith(b">")) or b"\\" in v:
                return None
            bodies.append(v[3:-1].replace(b"><Un", b","))
            rests.append(text[pos:a] + b'""' + text[b + 1:stop])
            kinds.append(False)
            pos = stop
            continue
        if text[pos:stop].strip():
            return None                              # a story or something else: the record path
        pos = stop
    return (bodies, rests, kinds) if bodies else None


def _utterance_fields(objs: list, kinds: List[bool], counts: np.ndarray, table: Dict[str, int], default: int):
    """The parsed rests of ``_cut_unit_lists`` (one dict each) -> (language ids, frames, unknown field names),
    or None unless each is a plain utterance whose cut-out list was its unit list (``duration`` checked and
    summed into its frames)."""
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
    return lang_ids, frames, unknown


def _load_lines(lines: List[bytes]) -> Optional[list]:
    """JSON lines -> their values, parsed by orjson as one array; blank lines (kept in chunks for the line
    numbers) are dropped only when the first try fails on them. None on invalid JSON."""
    try:
        return orjson.loads(b"[" + b",".join(lines) + b"]")
    except orjson.JSONDecodeError:
        pass
    body = [t for t in lines if t.strip()]
    if not body:
        return None
    try:
        return orjson.loads(b"[" + b",".join(body) + b"]")
    except orjson.JSONDecodeError:
        return None


def _column(objs: List[dict], key: str, default=None) -> list:
    """``[o.get(key, default) for o in objs]`` without Python bytecode per record (map + dict.get run in C)."""
    return list(map(dict.get, objs, itertools.repeat(key, len(objs)), itertools.repeat(default, len(objs))))


def _lang_ids(langs: list, table: Dict[str, int]) -> Optional[np.ndarray]:
    """Language names -> ids, or None if any is not a known language (a str in ``table``)."""
    try:
        kinds = set(langs)
    except TypeError:                                # an unhashable value (list, dict): the record path
        return None
    if not all(type(l) is str and l in table for l in kinds):
        return None
    if len(kinds) == 1:
        return np.full(len(langs), table[langs[0]], dtype=np.uint8)
    return np.fromiter(map(table.__getitem__, langs), dtype=np.uint8, count=len(langs))


def _bounds_by_template(lines, table: Dict[str, int], default: str):
    """The sidecar chunk through ``template_lines``: (starts, ends, language ids, field names), or None."""
    got = _layouts(lines.text if isinstance(lines, LineText) else b"".join(lines), ("start", "end"), ("lang",))
    if got is None or got[1].size == 0:
        return None
    templates, _, tmpl_of, ints = got
    got = _layout_langs(templates, table, default)
    if got is None:
        return None
    ids, keys = got
    return ints["start"], ints["end"], ids[tmpl_of], keys


def _layouts(text: bytes, int_keys: Sequence[str], fixed_keys: Sequence[str]):
    """``template_lines`` over a chunk's text (its last line may lack its newline)."""
    if not text.endswith(b"\n"):
        text += b"\n"
    return template_lines(np.frombuffer(text, dtype=np.uint8), int_keys, fixed_keys)


def _layout_langs(templates, table: Dict[str, int], default: str):
    """Each layout's language id (0 for blank lines) and the field names of all layouts, or None if a
    layout's ``lang`` is not a known language."""
    ids, keys = [], set()
    for t in templates:
        lid = 0
        if not t.blank:
            lang = t.obj.get("lang", default)
            lid = table.get(lang) if type(lang) is str else None
            if lid is None:
                return None
            keys.update(t.obj)
        ids.append(lid)
    return np.array(ids, dtype=np.uint8), keys


def _bounds_by_objects(lines, table: Dict[str, int], default: str):
    """The sidecar chunk parsed by orjson, one dict per line (any layout): the same result, or None.

    No Python bytecode per record: orjson parses the whole chunk as one array, the columns come out with
    C-level ``map(dict.get, ...)``, and types are checked as sets of types."""
    objs = _load_lines(lines.lines() if isinstance(lines, LineText) else lines)
    if not objs or set(map(type, objs)) != {dict}:
        return None
    st = _column(objs, "start")
    en = _column(objs, "end")
    if set(map(type, st)) != {int} or set(map(type, en)) != {int}:     # C-level type check (no bools)
        return None
    try:
        a = np.array(st, dtype=np.int64)
        b = np.array(en, dtype=np.int64)
    except OverflowError:
        return None
    lang_ids = _lang_ids(_column(objs, "lang", default), table)
    if lang_ids is None:
        return None
    keys = set()
    keys.update(*objs)
    return a, b, lang_ids, keys


def npy_chunk(path: str, lines, source: str, opts: BuildOptions, dtype):
    """.bounds.jsonl lines of ``path`` (a list of lines, or a formats.LineText) -> assemble(...) + unknown field
    names + (first record's start, last record's end), or None. The sidecar is read by its layouts
    (``template_lines``) when it is machine-written, else by orjson."""
    table = _lang_table(opts)
    cols = _bounds_by_template(lines, table, opts.lang) or _bounds_by_objects(lines, table, opts.lang)
    if cols is None:
        return None
    a, b, lang_ids, keys = cols
    arr = load_npy(path)
    if np.any(a < 0) or np.any(b <= a) or np.any(b > arr.shape[0]):
        return None
    # each range starts where the previous one ends (or after it, --allow-gaps); else the record path names
    # the line. Across chunks the build checks ``span``: (first start, last end)
    if a.size > 1 and not (np.all(a[1:] >= b[:-1]) if opts.allow_gaps else np.array_equal(a[1:], b[:-1])):
        return None
    unknown = keys - BOUNDS_FIELDS
    units = _gather(arr, a, b)
    units = None if units is None else token_body(units, opts, dtype)
    if units is None:
        return None
    counts = b - a
    return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (
        unknown, (int(a[0]), int(b[-1])))


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
    d = load_npz(path)
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
    units = None if units is None else token_body(units, opts, dtype)
    if units is None:
        return None
    counts = b - a
    return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (set(),)


def arrow_chunk(spec, first: int, count: int, opts: BuildOptions, dtype):
    """Rows first..first+count-1 (1-based) of a parquet / Arrow / save_to_disk input (``arrow_inputs``: the
    unit column's offsets and flattened values as NumPy arrays) -> assemble(...) + ignored columns, or None."""
    table = _lang_table(opts)
    cols = arrow_inputs.chunk_columns(spec.path, spec.table, first, count, table, opts.lang)
    if cols is None:
        return None
    units, counts, lang_ids, frames, unknown = cols
    units = token_body(units, opts, dtype)
    if units is None:
        return None
    return assemble(units, counts, lang_ids, frames, source=spec.source, opts=opts, dtype=dtype,
                    lang_names=opts.vocab.languages) + (unknown,)


__all__ = ["assemble", "token_body", "jsonl_chunk", "npy_chunk", "npz_chunk", "arrow_chunk", "bounds_path"]
