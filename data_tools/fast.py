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

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from megaslm.vocab import LANG_NONE

from data_tools.formats import (AUDIO_REPR_FIELDS, BOUNDS_FIELDS, UTT_FIELDS, LineText, _load_npy, _load_npz,
                                bounds_path)
from data_tools.streams import BuildOptions, Stats

def parse_int_lists(bodies: Sequence[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The texts of JSON integer arrays without brackets (``b"12, 907, 3"``) -> (all values as one unsigned
    array, the count per body), or None unless every body is a non-empty list of plain JSON integers below
    ``limit`` (digits only: no sign, fraction, exponent, leading zero or empty element; spaces allowed
    before a number, not after one -- the rare valid ``"1 ,2"`` goes to the record path).

    How: the bodies are joined (with ','), and every step is a whole-buffer NumPy operation (SIMD byte
    compares, no per-byte Python and no bytes methods, which are ~50x slower here). Each number is then read with
    one gather: the B bytes that end at its last digit (B = 4, or 8 for codebooks above 10^4 units), as one
    little-endian word, converted SWAR-style (SIMD within a register: digit bytes kept, the bytes before the
    number's first digit zeroed, then pairs, quads and octets combined with three multiply-adds). NumPy has
    no text->int conversion that is both strict (JSON) and vectorised (``np.fromstring(sep=",")`` accepts
    "1.5", "+1", "01", ...) -- hence this."""
    m = len(bodies)
    if not m:
        return None
    W = len(str(max(int(limit) - 1, 1)))             # digits of the largest unit
    if W > 8:
        return None
    B, word = (4, np.dtype("<u4")) if W <= 4 else (8, np.dtype("<u8"))
    # every number is followed by a ',' (one after the last body too): a number's last digit is the byte
    # before a ',', and the bodies' ends follow from their byte lengths
    joined = b",".join(bodies) + b","
    size = len(joined)
    raw = np.frombuffer(joined, dtype=np.uint8)
    y = raw ^ np.uint8(48)                           # digits -> 0..9; ' ' -> 16, ',' -> 28
    isd = y < 10
    issep = y == 28
    issp = y == 16
    if np.count_nonzero(isd | issep | issp) != size:
        return None                                  # any other byte: sign, '.', 'e', quote, '/', tab, ...
    if issep[0] or np.any(issep[1:] & ~isd[:-1]):
        return None                                  # an empty element: ",,", ", ,", "", a leading ','
    if np.any(issp[1:] & isd[:-1]):
        return None                                  # a space after a digit ("1 2" is not 12)
    lead0 = y[1:-1] == 0
    lead0 &= ~isd[:-2]
    lead0 &= isd[2:]                                 # a '0' that starts a number and a digit after it
    if (y[0] == 0 and isd[1]) or np.any(lead0):
        return None                                  # a leading zero ("012" is not JSON)
    last = np.flatnonzero(issep)
    last -= 1                                        # each number's last digit
    n = last.size
    ends = np.fromiter(map(len, bodies), dtype=np.int64, count=m)
    ends += 1
    np.cumsum(ends, out=ends)                        # byte just past each body's ','
    counts = np.diff(np.searchsorted(last, ends), prepend=0)
    pad = np.empty(size + B, dtype=np.uint8)         # B non-digit bytes in front: every window is in range
    pad[:B] = 16
    pad[B:] = y
    # overlapping words: element i = pad[i:i+B] (unaligned; NumPy reads it correctly)
    win = np.ndarray((size + 1,), dtype=word, buffer=pad, strides=(1,))
    # the B bytes ending at the last digit (pad index last+B). np.take copies the strided view into a
    # contiguous array first, then gathers aligned words: on a ~256 KB batch (_parse_in_batches) that is
    # 118 us against 205 us for indexing the unaligned view directly (measured, 47k numbers)
    v = np.take(win, last + 1)
    k = [word.type(x & ((1 << 8 * B) - 1)) for x in (0x7070707070707070, 0x8080808080808080, 0xFF, 8, 16, 32,
                                                     7, 10, 100, 10000, 0x00FF00FF00FF00FF,
                                                     0x0000FFFF0000FFFF, 0xFFFFFFFF)]
    c70, c80, cff, s8, s16, s32, s7, t10, t100, t1e4, m8, m16, m32 = k
    nd = (v + c70) & c80                             # bit 7 of each non-digit byte (no carry: bytes < 0x40)
    nd |= nd >> s8                                   # smear down: every byte at or before the last non-digit
    nd |= nd >> s16
    if B == 8:
        nd |= nd >> s32
    longer = np.take(pad, last) < 10                 # pad[last]: the byte just before the window is a digit
    longer &= nd == 0                                # ... and so are all B bytes in it
    if np.any(longer):
        return None                                  # more than B digits (W < digits <= B: out of range)
    nd >>= s7
    nd *= cff                                        # 0xFF on the bytes that are not the number's digits
    np.bitwise_and(v, nd, out=nd)
    v ^= nd                                          # keep only the number's digit bytes
    v = (v * t10 + (v >> s8)) & m8                   # 2-digit lanes
    v = (v * t100 + (v >> s16)) & m16                # 4-digit lanes
    if B == 8:
        v = (v * t1e4 + (v >> s32)) & m32
    return v, counts


PARSE_BATCH_BYTES = 256 << 10


def _parse_in_batches(bodies: List[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``parse_int_lists`` over batches of about PARSE_BATCH_BYTES of text: its ~20 whole-buffer passes
    then run on buffers that stay in the core's L2 cache (a 1,024-line chunk of the benchmark's JSONL is
    1.3 MB, and each pass makes a temporary of that size): ~8% faster on the benchmark input."""
    total = sum(map(len, bodies))
    if total <= PARSE_BATCH_BYTES:
        return parse_int_lists(bodies, limit)
    if max(map(len, bodies)) > 2 * PARSE_BATCH_BYTES:
        return _parse_long_bodies(bodies, limit)
    per = max(1, len(bodies) * PARSE_BATCH_BYTES // total)
    vals, counts = [], []
    for i in range(0, len(bodies), per):
        got = parse_int_lists(bodies[i:i + per], limit)
        if got is None:
            return None
        vals.append(got[0])
        counts.append(got[1])
    return np.concatenate(vals), np.concatenate(counts)


def _parse_long_bodies(bodies: List[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``_parse_in_batches`` where some bodies are long (one utterance of millions of units): each is cut at
    a ',' about every PARSE_BATCH_BYTES into pieces parsed as lists of their own (views, no copies), and
    the pieces' counts are summed back per body. So the parse's ~20 temporaries stay the size of a batch,
    not of the line (a 55 MB line took ~17x its size in memory parsed whole). A cut that makes an empty
    piece (",,", a trailing ',') fails the parse, as the uncut body would."""
    pieces: List[memoryview] = []
    first_piece = np.empty(len(bodies), dtype=np.int64)
    for k, body in enumerate(bodies):
        first_piece[k] = len(pieces)
        view, a, n = memoryview(body), 0, len(body)
        while n - a > PARSE_BATCH_BYTES:
            c = body.find(b",", a + PARSE_BATCH_BYTES)
            if c < 0:
                break
            pieces.append(view[a:c])
            a = c + 1
        pieces.append(view[a:])
    got = _parse_in_batches(pieces, limit)
    if got is None:
        return None
    return got[0], np.add.reduceat(got[1], first_piece)


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
    text = lines.text if isinstance(lines, LineText) else b"".join(lines)
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
    if not bodies:
        return None
    table = _lang_table(opts)
    by_layout = _utterance_layouts(rests, table, opts.lang) if all(kinds) else None
    if by_layout is None:
        try:
            objs = orjson.loads(b"[" + b",".join(rests) + b"]")
        except orjson.JSONDecodeError:
            return None
    parsed = _parse_in_batches(bodies, opts.vocab.codebook_size)
    if parsed is None:
        return None
    units, counts = parsed
    units = token_body(units, opts, dtype)
    if units is None:
        return None
    if by_layout is not None:
        lang_ids, unknown = by_layout
        return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (unknown,)
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


_DIGIT_MAX = 15          # template_lines: longer integers go to orjson (record path semantics for huge values)


class _Template:
    """One line layout of ``template_lines``: the line with every run of digits squashed to one 0xFF byte
    (a "slot"), parsed once with its slots read as 1 (and probed: one slot at a time read as 2)."""

    __slots__ = ("obj", "int_slot", "blank", "slots")

    def __init__(self, row: np.ndarray, int_keys: Sequence[str], fixed_keys: Sequence[str]):
        self.int_slot: Dict[str, int] = {}
        text = row.tobytes()
        self.blank = not text.strip()
        self.obj = None
        slots = np.flatnonzero(row == 255)
        self.slots = int(slots.size)
        if self.blank:
            return
        if b"\\" in text:        # escapes: a digit slot could sit inside one (\u00e9); orjson decides
            raise _NotUniform
        base = bytearray(text)
        for s in slots:
            base[s] = 49                                  # '1'
        try:
            obj = orjson.loads(bytes(base))
        except orjson.JSONDecodeError:
            raise _NotUniform from None
        if type(obj) is not dict:
            raise _NotUniform
        string_keys = set()
        for j, s in enumerate(slots):
            probe = bytearray(base)
            probe[s] = 50                                 # '2'
            try:
                other = orjson.loads(bytes(probe))
            except orjson.JSONDecodeError:
                raise _NotUniform from None
            changed = [k for k in obj if obj[k] != other.get(k)] if other.keys() == obj.keys() else None
            if not changed or len(changed) != 1:
                raise _NotUniform          # a slot without one visible effect (duplicate keys, nesting, ...)
            k = changed[0]
            if type(obj[k]) is int and obj[k] == 1 and other[k] == 2:
                if k in self.int_slot:
                    raise _NotUniform
                self.int_slot[k] = j
            elif type(obj[k]) is str and type(other[k]) is str:
                string_keys.add(k)         # digits inside a string: any digits are valid there
            else:
                raise _NotUniform          # a float, a negative or nested number: orjson decides
        if any(k not in self.int_slot for k in int_keys) or any(k in string_keys or k in self.int_slot
                                                                             for k in fixed_keys):
            raise _NotUniform
        self.obj = obj


class _NotUniform(Exception):
    pass


_U8 = [np.uint64(x) for x in (0x7F7F7F7F7F7F7F7F, 0x7676767676767676, 0x8080808080808080, 8, 16, 32, 7, 0xFF,
                               10, 100, 10000, 0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0xFFFFFFFF)]


def _read_integers_swar(d: np.ndarray, last: np.ndarray):
    """The integers whose last digit sits at ``last`` in ``d`` (bytes - 48: digits 0..9) -> (values,
    digit counts, leading digits), each read with one gather of the 8 bytes ending at its last digit,
    combined SWAR-style (as in ``parse_int_lists``, but carry-free for any byte before the number, since
    here the bytes around a number are any text); None if any integer has more than 8 digits."""
    c7f, c76, c80, s8, s16, s32, s7, cff, t10, t100, t1e4, m8, m16, m32 = _U8
    pad = np.empty(d.size + 8, dtype=np.uint8)
    pad[:8] = 255                                # non-digits in front: every window is in range
    pad[8:] = d
    win = np.ndarray((d.size + 1,), dtype="<u8", buffer=pad, strides=(1,))
    v = win[last + 1]                            # pad[last+1 : last+9] = d[last-7 : last+1]
    nd = (v & c7f) + c76                         # bit 7 of each byte >= 10 (no carry: bytes <= 0x7F + 0x76)
    nd |= v
    nd &= c80                                    # ... or >= 128: the non-digit bytes
    nd |= nd >> s8                               # smear down: every byte at or before the last non-digit
    nd |= nd >> s16
    nd |= nd >> s32
    if np.any(nd == 0):
        return None                              # 8 digits and more before them
    nd >>= s7
    nd *= cff                                    # 0xFF on the bytes that are not the number's digits
    width = 8 - np.bitwise_count(nd).astype(np.int64) // 8
    lead = d[last - width + 1]
    v &= ~nd                                     # keep only the number's digit bytes
    v = (v * t10 + (v >> s8)) & m8               # 2-digit lanes
    v = (v * t100 + (v >> s16)) & m16            # 4-digit lanes
    v = (v * t1e4 + (v >> s32)) & m32
    return v.astype(np.int64), width, lead


def _read_integers_by_digit(raw: np.ndarray, b: np.ndarray):
    """``_read_integers_swar`` for integers of up to _DIGIT_MAX digits, one digit position per step from
    the last digit backwards, until a non-digit; None if any is longer."""
    val = raw[b].astype(np.int64) - 48
    lead = val.copy()                            # the leftmost digit so far
    width = np.ones(b.shape, dtype=np.int64)
    more = np.ones(b.shape, dtype=bool)
    scale = 1
    for k in range(1, _DIGIT_MAX + 1):
        at = b - k
        np.maximum(at, 0, out=at)
        c = raw[at]
        more &= (c - np.uint8(48)) < 10
        more &= b >= k
        if not more.any():
            return val, width, lead
        if k == _DIGIT_MAX:
            return None                          # a huge integer: orjson decides
        width += more
        scale *= 10
        c = c.astype(np.int64) - 48
        np.copyto(lead, c, where=more)
        val += np.where(more, c * scale, 0)
    return None


def template_lines(raw: np.ndarray, int_keys: Sequence[str], fixed_keys: Sequence[str] = (),
                   max_templates: int = 16):
    """Machine-written JSON lines (every line the same few layouts, differing only in the digits they
    carry: ``{"id": "u17", "start": 4120, "end": 4388, "lang": "en"}``) -> (templates, the index of each
    record (non-blank line), the template of each record, {key: its integer in each record} for
    ``int_keys``, which every record must hold), or None when the lines are not like that (the caller then
    has orjson parse them one object each).

    ``raw``: the lines' bytes, each line ending with a newline. Every run of digits is squashed to one
    0xFF byte (a slot: never a byte of UTF-8 text; a stray 0xFF in the input makes a slot without a run of
    digits, and the slot count then refuses); the lines then fall into a few distinct layouts
    ("templates"), each checked once with orjson (its slots read as 1, and each slot read as 2 to see which
    field it feeds: an integer field, or digits inside a string). A line whose layout is valid JSON with plain integer fields is valid JSON for
    any digits in its slots, except a leading zero in an integer (refused here); so the whole chunk is
    validated by a few NumPy passes over its bytes and ~(slots + 1) orjson calls per layout, instead of
    one Python dict per line. The values of ``fixed_keys`` (e.g. ``lang``) are read from the template
    (a slot inside them refuses). Blank lines are their own template (``blank``)."""
    size = raw.size
    if size == 0 or raw[-1] != 10:
        return None
    d = raw - np.uint8(48)                       # digits -> 0..9, every other byte -> 10..255
    isd = d < 10
    inner = isd[1:] & isd[:-1]                   # a digit after a digit: squashed away
    keep = np.empty(size, dtype=bool)
    keep[0] = True
    np.logical_not(inner, out=keep[1:])
    slotted = raw | np.negative(isd.view(np.uint8))              # every digit -> 0xFF (a slot)
    sq = slotted[keep]                           # each run of digits -> one slot
    ends = np.flatnonzero(sq == 10)
    n = ends.size
    lens = np.empty(n, dtype=np.int64)
    lens[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lens[1:])
    starts = ends - lens + 1
    tmpl_of = np.zeros(n, dtype=np.int64)
    templates: List[_Template] = []
    try:
        uniq = [int(lens[0])] if lens.min() == lens.max() else np.unique(lens).tolist()
        if len(uniq) > max_templates:
            return None
        for L in uniq:
            idx = np.flatnonzero(lens == L) if len(uniq) > 1 else np.arange(n)
            rows = sq.reshape(n, L) if len(uniq) == 1 else sq[starts[idx][:, None] + np.arange(L)]
            todo = np.arange(idx.size)
            sub = rows
            while todo.size:
                if len(templates) == max_templates:
                    return None
                row = sub[0]
                # the rows that differ from this one: their few differing bytes, not a reduction per row
                differ = np.zeros(todo.size, dtype=bool)
                differ[np.flatnonzero(sub != row) // L] = True
                if templates:
                    tmpl_of[idx[todo[~differ]]] = len(templates)
                templates.append(_Template(row, int_keys, fixed_keys))
                todo = todo[differ]
                sub = rows[todo]
    except _NotUniform:
        return None
    # the last digit of every run of digits, in order: run r of line i is run first_run[i] + r
    last = isd
    last[:-1] &= ~isd[1:]                         # (isd is not needed any more)
    run_end = np.flatnonzero(last)
    slots = np.array([t.slots for t in templates], dtype=np.int64)
    if len(templates) == 1:
        if n * int(slots[0]) != run_end.size or templates[0].blank:
            return None
        records = np.arange(n)
        first_run = records * int(slots[0])
    else:
        per_line = slots[tmpl_of]
        if int(per_line.sum()) != run_end.size:
            return None
        first_run = np.cumsum(per_line) - per_line
        records = np.flatnonzero(~np.array([t.blank for t in templates])[tmpl_of])
        tmpl_of, first_run = tmpl_of[records], first_run[records]
    if not int_keys:
        return templates, records, tmpl_of, {}
    # every key's run in every record, all keys at once: (keys, records)
    slot_of = np.array([[t.int_slot.get(key, 0) for t in templates] for key in int_keys], dtype=np.int64)
    if len(templates) == 1:
        b = run_end[first_run + slot_of[:, :1]]
    else:
        b = run_end[first_run + slot_of[:, tmpl_of]]
    got = _read_integers_swar(d, b)
    if got is None:
        got = _read_integers_by_digit(raw, b)
    if got is None:
        return None
    val, width, lead = got
    if np.any((width > 1) & (lead == 0)):
        return None                              # a leading zero ("012" is not JSON)
    return templates, records, tmpl_of, dict(zip(int_keys, val))


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
    arr = _load_npy(path)
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
    units = None if units is None else token_body(units, opts, dtype)
    if units is None:
        return None
    counts = b - a
    return assemble(units, counts, lang_ids, counts, source, opts, dtype, opts.vocab.languages) + (set(),)


__all__ = ["parse_int_lists", "template_lines", "assemble", "jsonl_chunk", "npy_chunk", "npz_chunk", "bounds_path"]
