"""Machine-written JSON lines read by their few layouts ("templates"), with no Python object per line:
``template_lines``. Format-agnostic: the caller names the integer fields it needs and the fields whose values
a layout fixes (``data_tools.fast`` reads .bounds.jsonl sidecars and ``units`` lines this way). The integers
themselves are read by ``data_tools.intparse``.

Like the rest of the vectorised path, ``template_lines`` returns ``None`` when it cannot vouch for the lines;
the caller then has orjson parse them one object each.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import orjson

from data_tools.intparse import read_integers_at


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
    field it feeds: an integer field, or digits inside a string). A line whose layout is valid JSON with plain
    integer fields is valid JSON for any digits in its slots, except a leading zero in an integer (refused
    here); so the whole chunk is validated by a few NumPy passes over its bytes and ~(slots + 1) orjson calls
    per layout, instead of one Python dict per line. The values of ``fixed_keys`` (e.g. ``lang``) are read
    from the template (a slot inside them refuses). Blank lines are their own template (``blank``)."""
    if raw.size == 0 or raw[-1] != 10:
        return None
    d = raw - np.uint8(48)                       # digits -> 0..9, every other byte -> 10..255
    isd = d < 10
    sq, lens = _squash_digit_runs(raw, isd)
    try:
        grouped = _group_layouts(sq, lens, int_keys, fixed_keys, max_templates)
    except _NotUniform:
        return None
    if grouped is None:
        return None
    templates, tmpl_of = grouped
    runs = _record_runs(isd, templates, tmpl_of)
    if runs is None:
        return None
    run_end, records, tmpl_of, first_run = runs
    if not int_keys:
        return templates, records, tmpl_of, {}
    # every key's run in every record, all keys at once: (keys, records)
    slot_of = np.array([[t.int_slot.get(key, 0) for t in templates] for key in int_keys], dtype=np.int64)
    if len(templates) == 1:
        b = run_end[first_run + slot_of[:, :1]]
    else:
        b = run_end[first_run + slot_of[:, tmpl_of]]
    val = read_integers_at(raw, d, b)
    if val is None:
        return None
    return templates, records, tmpl_of, dict(zip(int_keys, val))


def _squash_digit_runs(raw: np.ndarray, isd: np.ndarray):
    """The lines with every run of digits squashed to one 0xFF slot, and each squashed line's length."""
    inner = isd[1:] & isd[:-1]                   # a digit after a digit: squashed away
    keep = np.empty(raw.size, dtype=bool)
    keep[0] = True
    np.logical_not(inner, out=keep[1:])
    slotted = raw | np.negative(isd.view(np.uint8))              # every digit -> 0xFF (a slot)
    sq = slotted[keep]                           # each run of digits -> one slot
    ends = np.flatnonzero(sq == 10)
    lens = np.empty(ends.size, dtype=np.int64)
    lens[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lens[1:])
    return sq, lens


def _group_layouts(sq: np.ndarray, lens: np.ndarray, int_keys: Sequence[str], fixed_keys: Sequence[str],
                   max_templates: int):
    """The distinct squashed lines (templates, each checked by ``_Template``) and each line's template, or
    None if there are more than ``max_templates``; raises _NotUniform for a layout it cannot vouch for."""
    n = lens.size
    starts = np.cumsum(lens) - lens
    tmpl_of = np.zeros(n, dtype=np.int64)
    templates: List[_Template] = []
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
    return templates, tmpl_of


def _record_runs(isd: np.ndarray, templates: List["_Template"], tmpl_of: np.ndarray):
    """(the last byte of every run of digits, the records (non-blank lines), their templates, each record's
    first run), or None if the runs do not match the templates' slots (a stray 0xFF byte)."""
    n = tmpl_of.size
    last = isd
    last[:-1] &= ~isd[1:]                         # the last digit of every run (isd is not needed any more)
    run_end = np.flatnonzero(last)
    slots = np.array([t.slots for t in templates], dtype=np.int64)
    if len(templates) == 1:
        if n * int(slots[0]) != run_end.size or templates[0].blank:
            return None
        records = np.arange(n)
        return run_end, records, tmpl_of, records * int(slots[0])
    per_line = slots[tmpl_of]
    if int(per_line.sum()) != run_end.size:
        return None
    first_run = np.cumsum(per_line) - per_line    # run r of line i is run first_run[i] + r
    records = np.flatnonzero(~np.array([t.blank for t in templates])[tmpl_of])
    return run_end, records, tmpl_of[records], first_run[records]


__all__ = ["template_lines"]
