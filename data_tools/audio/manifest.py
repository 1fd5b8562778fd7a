"""Which audio files to tokenise: a manifest (CSV with a header, or JSONL) or a folder walk.

Columns / keys: ``path`` (required; relative paths are relative to the manifest's folder), ``id``
(default: the path as listed), ``lang`` (default ``--lang``), and for sentence-aligned parallel audio
``story`` + ``sentence`` (integer index of the sentence in its story). Either every row has
story/sentence (parallel stories output) or none has (utterance output).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import List, Optional, Sequence

from data_tools.errors import DataError

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
COLUMNS = ("path", "id", "lang", "story", "sentence")


@dataclasses.dataclass(frozen=True)
class AudioEntry:
    path: str                  # absolute or as resolved
    listed: str                # as written in the manifest (relative to the root for folders)
    id: str
    lang: str
    story: Optional[str] = None
    sentence: Optional[int] = None
    where: str = ""            # "manifest:line" for errors


def _row(obj: dict, base: str, where_file: str, line: int, default_lang: str,
         languages: Optional[Sequence[str]]) -> AudioEntry:
    def bad(msg, field=None):
        return DataError(msg, path=where_file, line=line, field=field)

    unknown = set(k for k in obj if k is not None) - set(COLUMNS)
    if unknown:
        raise bad(f"unknown column(s) {sorted(unknown)}; expected {list(COLUMNS)}")
    p = obj.get("path")
    if not isinstance(p, str) or not p.strip():
        raise bad("missing or empty (the audio file's path)", "path")
    p = p.strip()
    full = p if os.path.isabs(p) else os.path.join(base, p)
    if not os.path.isfile(full):
        raise bad(f"audio file not found: {full}", "path")
    lang = obj.get("lang") or default_lang
    if not isinstance(lang, str):
        raise bad(f"expected a language name, got {lang!r}", "lang")
    if languages is not None and lang not in languages:
        raise bad(f"unknown language {lang!r}; expected one of {list(languages)}", "lang")
    rid = obj.get("id")
    rid = p if rid in (None, "") else str(rid)
    story, sent = obj.get("story"), obj.get("sentence")
    if story in ("", None) and sent in ("", None):
        story, sent = None, None
    else:
        if story in ("", None):
            raise bad("missing (a row with 'sentence' needs its story id)", "story")
        try:
            sent = int(sent)
            if sent < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise bad(f"expected a non-negative integer sentence index, got {sent!r}", "sentence") from None
        story = str(story)
    return AudioEntry(full, p, rid, lang, story, sent, f"{where_file}:{line}")


def read_manifest(path: str, default_lang: str = "en", languages: Optional[Sequence[str]] = None) -> List[AudioEntry]:
    if not os.path.isfile(path):
        raise DataError("manifest not found", path=path)
    base = os.path.dirname(os.path.abspath(path))
    out: List[AudioEntry] = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for ln, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=ln) from None
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=ln)
                out.append(_row(obj, base, path, ln, default_lang, languages))
        else:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise DataError(f"expected a CSV header naming 'path' (and optionally {list(COLUMNS[1:])}), "
                                f"got {reader.fieldnames}", path=path, line=1)
            for row in reader:
                if None in row:
                    raise DataError(f"{len(reader.fieldnames) + len(row[None])} fields but the header has "
                                    f"{len(reader.fieldnames)}", path=path, line=reader.line_num)
                out.append(_row(row, base, path, reader.line_num, default_lang, languages))
    return check_entries(out, path)


def scan_folder(root: str, lang: str = "en") -> List[AudioEntry]:
    """Every audio file under ``root`` (sorted relative paths: the order, hence the sharding, is deterministic)."""
    if not os.path.isdir(root):
        raise DataError("audio folder not found", path=root)
    rels = []
    for d, _, files in os.walk(root):
        for fn in files:
            if fn.lower().endswith(AUDIO_EXTS):
                rels.append(os.path.relpath(os.path.join(d, fn), root))
    rels.sort()
    out = [AudioEntry(os.path.join(root, r), r, r, lang, where=os.path.join(root, r)) for r in rels]
    if not out:
        raise DataError(f"no audio files ({', '.join(AUDIO_EXTS)}) under this folder", path=root)
    return out


def check_entries(entries: List[AudioEntry], path: str) -> List[AudioEntry]:
    if not entries:
        raise DataError("no audio files listed", path=path)
    seen = {}
    for e in entries:
        if e.id in seen:
            raise DataError(f"duplicate id {e.id!r} (first at {seen[e.id]})", path=e.where, field="id")
        seen[e.id] = e.where
    kinds = {e.story is not None for e in entries}
    if len(kinds) > 1:
        first = next(e for e in entries if (e.story is None) != (entries[0].story is None))
        raise DataError("some rows have story/sentence and others not: a manifest is either parallel stories or "
                        "utterances", path=first.where, field="story")
    if entries[0].story is not None:
        keys = {}
        for e in entries:
            k = (e.story, e.lang, e.sentence)
            if k in keys:
                raise DataError(f"story {e.story!r} has sentence {e.sentence} in {e.lang!r} twice (first at "
                                f"{keys[k]})", path=e.where, field="sentence")
            keys[k] = e.where
    return entries
