"""Format-agnostic integer parsing for the vectorised paths (``data_tools.fast``, ``data_tools.templates``):
decimal integers read out of raw text bytes with whole-buffer NumPy operations, with no Python step per
number. Nothing here knows a dataset format: ``parse_int_lists`` reads the bodies of JSON integer arrays,
``read_integers_at`` the integers that end at given byte positions of any text.

Every function returns ``None`` when it cannot vouch for its input (a sign, a fraction, a leading zero, a
number too long, ...): the caller then parses that input the slow, exact way.

Why hand-written: JSON libraries build one Python int per number, and NumPy has no text->int conversion that
is both strict (JSON) and vectorised (``np.fromstring(sep=",")`` accepts "1.5", "+1", "01", ...).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def parse_int_lists(bodies: Sequence[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The texts of JSON integer arrays without brackets (``b"12, 907, 3"``) -> (all values as one unsigned
    array, the count per body), or None unless every body is a non-empty list of plain JSON integers below
    ``limit`` (digits only: no sign, fraction, exponent, leading zero or empty element; spaces allowed
    before a number, not after one -- the rare valid ``"1 ,2"`` goes to the record path).

    How: the bodies are joined (with ','), and every step is a whole-buffer NumPy operation (SIMD byte
    compares, no per-byte Python and no bytes methods, which are ~50x slower here). Each number is then read with
    one gather: the B bytes that end at its last digit (B = 4, or 8 for codebooks above 10^4 units), as one
    little-endian word, converted SWAR-style (SIMD within a register: digit bytes kept, the bytes before the
    number's first digit zeroed, then pairs, quads and octets combined with three multiply-adds)."""
    m = len(bodies)
    if not m:
        return None
    W = len(str(max(int(limit) - 1, 1)))             # digits of the largest unit
    if W > 8:
        return None
    # every number is followed by a ',' (one after the last body too): a number's last digit is the byte
    # before a ',', and the bodies' ends follow from their byte lengths
    joined = b",".join(bodies) + b","
    y = np.frombuffer(joined, dtype=np.uint8) ^ np.uint8(48)    # digits -> 0..9; ' ' -> 16, ',' -> 28
    issep = _strict_json_integers(y)
    if issep is None:
        return None
    last = np.flatnonzero(issep)
    last -= 1                                        # each number's last digit
    ends = np.fromiter(map(len, bodies), dtype=np.int64, count=m)
    ends += 1
    np.cumsum(ends, out=ends)                        # byte just past each body's ','
    counts = np.diff(np.searchsorted(last, ends), prepend=0)
    v = _swar_lists(y, last, 4 if W <= 4 else 8)
    return None if v is None else (v, counts)


def _strict_json_integers(y: np.ndarray) -> Optional[np.ndarray]:
    """``parse_int_lists``'s checks over the joined text (bytes ^ 48): the ',' mask, or None unless the
    text is only plain JSON integers, each followed by a ',' (spaces allowed before a number)."""
    isd = y < 10
    issep = y == 28
    issp = y == 16
    if np.count_nonzero(isd | issep | issp) != y.size:
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
    return issep


def _swar_lists(y: np.ndarray, last: np.ndarray, B: int) -> Optional[np.ndarray]:
    """The numbers of ``parse_int_lists``' checked text whose last digits sit at ``last``, each read as the B
    bytes (one word) ending there; None if one has more than B digits."""
    word = np.dtype("<u4") if B == 4 else np.dtype("<u8")
    size = y.size
    pad = np.empty(size + B, dtype=np.uint8)         # B non-digit bytes in front: every window is in range
    pad[:B] = 16
    pad[B:] = y
    # overlapping words: element i = pad[i:i+B] (unaligned; NumPy reads it correctly)
    win = np.ndarray((size + 1,), dtype=word, buffer=pad, strides=(1,))
    # the B bytes ending at the last digit (pad index last+B). np.take copies the strided view into a
    # contiguous array first, then gathers aligned words: on a ~256 KB batch (parse_in_batches) that is
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
    return v


PARSE_BATCH_BYTES = 256 << 10


def parse_in_batches(bodies: List[bytes], limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
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
    """``parse_in_batches`` where some bodies are long (one utterance of millions of units): each is cut at
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
    got = parse_in_batches(pieces, limit)
    if got is None:
        return None
    return got[0], np.add.reduceat(got[1], first_piece)


DIGIT_MAX = 15           # read_integers_at: longer integers are refused (the caller's exact parser decides)


def read_integers_at(raw: np.ndarray, d: np.ndarray, last: np.ndarray) -> Optional[np.ndarray]:
    """The decimal integers of the text ``raw`` (bytes; ``d`` = raw - 48) whose last digits sit at ``last``
    (each run of digits read back to its first digit) -> int64 values, or None if one has a leading zero
    ("012" is not JSON) or more than DIGIT_MAX digits."""
    got = _read_integers_swar(d, last)
    if got is None:
        got = _read_integers_by_digit(raw, last)
    if got is None:
        return None
    val, width, lead = got
    if np.any((width > 1) & (lead == 0)):
        return None                              # a leading zero ("012" is not JSON)
    return val


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
    """``_read_integers_swar`` for integers of up to DIGIT_MAX digits, one digit position per step from
    the last digit backwards, until a non-digit; None if any is longer."""
    val = raw[b].astype(np.int64) - 48
    lead = val.copy()                            # the leftmost digit so far
    width = np.ones(b.shape, dtype=np.int64)
    more = np.ones(b.shape, dtype=bool)
    scale = 1
    for k in range(1, DIGIT_MAX + 1):
        at = b - k
        np.maximum(at, 0, out=at)
        c = raw[at]
        more &= (c - np.uint8(48)) < 10
        more &= b >= k
        if not more.any():
            return val, width, lead
        if k == DIGIT_MAX:
            return None                          # a huge integer: the caller's exact parser decides
        width += more
        scale *= 10
        c = c.astype(np.int64) - 48
        np.copyto(lead, c, where=more)
        val += np.where(more, c * scale, 0)
    return None


__all__ = ["parse_int_lists", "parse_in_batches", "read_integers_at", "PARSE_BATCH_BYTES", "DIGIT_MAX"]
