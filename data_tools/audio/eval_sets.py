"""Spoken benchmarks from audio -> the evals JSONL format (evals/benchmarks.py, docs/evals.md).

Evaluation sets, converted (``python -m data_tools tokenize-bench``); nothing here measures speed (the speed
benchmarks and their records: docs/bench/README.md).

Accepted layouts (docs/audio.md has examples):

* Pair files: ``<id>_correct.<ext>`` and ``<id>_incorrect.<ext>`` (more wrong ones as
  ``<id>_incorrect_2.<ext>``, ...), optionally ``<id>_context.<ext>``. For StoryCloze / TopicCloze
  without a context file, each file is the whole story (context + ending, as distributed): the context
  is the units the correct and incorrect files share from the start, the candidates the rest.
* ZeroSpeech 2021 style: ``gold.csv`` with columns ``id`` (the pair), ``filename`` (with or without
  extension) and ``correct`` (1 / 0), audio beside it (sWUGGY, sBLIMP).
* Languages: the files directly in ROOT (language = the first of the training vocabulary's languages),
  or in subfolders named ``en``, ``fr`` (monolingual) or ``en-fr``, ``fr-en`` (StoryCloze/TopicCloze
  cross-lingual: context language - ending language).

Units are made by the same tokeniser as the training data: the tokeniser's unit_source must equal the
vocabulary's (the dataset manifest given with ``--like``), else the conversion is refused.
"""
from __future__ import annotations

import csv
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_tools.audio.io import load_audio
from data_tools.audio.manifest import AUDIO_EXTS
from data_tools.errors import DataError

KINDS = {"storycloze": "sSC", "topiccloze": "sTC", "swuggy": "sWUGGY", "sblimp": "sBLIMP"}
_PAIR = re.compile(r"^(?P<id>.+)_(?P<role>correct|incorrect(?:_\d+)?|context)$")


def _find_audio(folder: str, name: str) -> Optional[str]:
    p = os.path.join(folder, name)
    if os.path.splitext(name)[1].lower() in AUDIO_EXTS and os.path.isfile(p):
        return p
    for ext in AUDIO_EXTS:
        if os.path.isfile(p + ext):
            return p + ext
    return None


def collect_items(folder: str) -> List[Dict]:
    """[{id, context: path|None, correct: path, incorrect: [paths]}] of one folder, sorted by id."""
    items: Dict[str, Dict] = {}
    gold = os.path.join(folder, "gold.csv")
    if os.path.isfile(gold):
        with open(gold, newline="") as f:
            r = csv.DictReader(f)
            need = {"id", "filename", "correct"}
            if not r.fieldnames or not need <= set(r.fieldnames):
                raise DataError(f"expected columns {sorted(need)}, got {r.fieldnames}", path=gold, line=1)
            for row in r:
                where = (gold, r.line_num)
                p = _find_audio(folder, row["filename"])
                if p is None:
                    raise DataError(f"audio {row['filename']!r} not found in {folder}", path=where[0], line=where[1],
                                    field="filename")
                if row["correct"].strip() not in ("0", "1", "True", "False", "true", "false"):
                    raise DataError(f"expected 1 or 0, got {row['correct']!r}", path=where[0], line=where[1],
                                    field="correct")
                it = items.setdefault(row["id"], {"id": row["id"], "context": None, "correct": None, "incorrect": [],
                                                  "where": f"{gold}:{r.line_num}"})
                if row["correct"].strip() in ("1", "True", "true"):
                    if it["correct"] is not None:
                        raise DataError(f"pair {row['id']!r} has two correct files", path=gold, line=r.line_num)
                    it["correct"] = p
                else:
                    it["incorrect"].append(p)
    else:
        for fn in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in AUDIO_EXTS:
                continue
            m = _PAIR.match(stem)
            if not m:
                raise DataError("expected <id>_correct / <id>_incorrect[_N] / <id>_context audio names (or a "
                                "gold.csv)", path=os.path.join(folder, fn))
            it = items.setdefault(m["id"], {"id": m["id"], "context": None, "correct": None, "incorrect": [],
                                            "where": os.path.join(folder, fn)})
            role = m["role"]
            if role == "correct":
                it["correct"] = os.path.join(folder, fn)
            elif role == "context":
                it["context"] = os.path.join(folder, fn)
            else:
                it["incorrect"].append(os.path.join(folder, fn))
    out = []
    for iid in sorted(items):
        it = items[iid]
        if it["correct"] is None or not it["incorrect"]:
            raise DataError(f"item {iid!r} needs one correct and at least one incorrect file", path=it["where"])
        out.append(it)
    if not out:
        raise DataError("no benchmark items (audio pairs or gold.csv) in this folder", path=folder)
    return out


def _folders(root: str, kind: str, default_lang: str, vocab_langs) -> List[Tuple[str, Tuple[str, ...]]]:
    if not os.path.isdir(root):
        raise DataError("benchmark folder not found", path=root)
    subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    pat = re.compile(r"^[A-Za-z_]+(-[A-Za-z_]+)?$")
    lang_subs = [d for d in subs if pat.match(d)]
    pairwise = KINDS[kind] in ("sSC", "sTC")
    if not lang_subs:
        return [(root, (default_lang, default_lang) if pairwise else (default_lang,))]
    out = []
    for d in lang_subs:
        langs = tuple(d.split("-"))
        if len(langs) == 1 and pairwise:
            langs = (langs[0], langs[0])
        if len(langs) == 2 and not pairwise:
            raise DataError(f"{KINDS[kind]} is monolingual: expected a language folder, not {d!r}",
                            path=os.path.join(root, d))
        for l in langs:
            if l not in vocab_langs:
                raise DataError(f"language {l!r} is not in the training vocabulary's {list(vocab_langs)}",
                                path=os.path.join(root, d))
        out.append((os.path.join(root, d), langs))
    return out


def _vocab_like(like: str):
    from megaslm.vocab import VocabError, vocab_from_manifest
    try:
        return vocab_from_manifest(like)
    except VocabError as e:
        raise DataError(str(e)) from None


def convert_benchmark(kind: str, root: str, out_dir: str, tok, like: str, languages: Optional[str] = None,
                      batch_size: int = 16, progress: bool = True) -> Dict:
    import json

    from data_tools.audio.run import _atomic_write, _dedup
    vocab = _vocab_like(like)
    src = vocab.unit_source
    base = src[: -len(":dedup")] if src.endswith(":dedup") else src
    if not src:
        raise DataError("the training data records no tokeniser (vocab.unit_source is empty): cannot prove the "
                        "benchmark's units match; tokenise the training audio with `data_tools tokenize`", path=like)
    if base != tok.unit_source:
        raise DataError(f"the training data was tokenised by {src} but this tokeniser is {tok.unit_source}",
                        path=like)
    dedup = src.endswith(":dedup")
    bench = KINDS[kind]
    folders = _folders(root, kind, vocab.languages[0], vocab.languages)
    if languages:
        keep = set(languages.split(","))
        folders = [(f, l) for f, l in folders if set(l) <= keep]
    # every file, tokenised in length-sorted batches (units do not depend on the batch: tokenizers.py)
    plan = []
    for folder, langs in folders:
        for it in collect_items(folder):
            plan.append((langs, it))
    paths = sorted({p for _, it in plan for p in [it["context"], it["correct"], *it["incorrect"]] if p})
    waves = {}
    for p in paths:
        waves[p] = load_audio(p, tok.sample_rate, None, tok.min_samples)
    order = sorted(paths, key=lambda p: -len(waves[p]))
    units: Dict[str, List[int]] = {}
    it_range = range(0, len(order), batch_size)
    if progress:     # a bar on a TTY, else a line every --progress-every seconds
        from megaslm.progress import Progress
        it_range = Progress(f"tokenize-bench {bench} files", total=len(it_range), unit="batches").iterate(it_range)
    for j in it_range:
        chunk = order[j:j + batch_size]
        for p, u in zip(chunk, tok.encode_batch([waves[p] for p in chunk])):
            units[p] = _dedup(np.asarray(u))[0] if dedup else np.asarray(u).tolist()
    lines = []
    for langs, it in plan:
        cands = [units[it["correct"]]] + [units[p] for p in it["incorrect"]]
        ctx: List[int] = units[it["context"]] if it["context"] else []
        if bench in ("sSC", "sTC") and not it["context"]:
            n = 0
            while all(len(c) > n + 1 for c in cands) and all(c[n] == cands[0][n] for c in cands):
                n += 1
            if n == 0:
                raise DataError(f"item {it['id']!r}: the correct and incorrect files share no leading units; "
                                "give the context as <id>_context.<ext>", path=it["where"])
            ctx, cands = cands[0][:n], [c[n:] for c in cands]
        obj = {"id": f"{'-'.join(langs)}-{it['id']}", "benchmark": bench, "languages": list(langs),
               "candidates": cands, "correct": 0,
               "meta": {"files": [os.path.relpath(p, root) for p in [it["correct"], *it["incorrect"]]]}}
        if ctx:
            obj["context"] = ctx
        lines.append(json.dumps(obj))
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, f"{kind}.jsonl"), "".join(l + "\n" for l in lines))
    _atomic_write(os.path.join(out_dir, "manifest.json"),
                  # the format of evals/benchmarks.py (FORMAT, FORMAT_VERSION), written here: data_tools does not import evals
                  json.dumps({"format": "megaslm-evals", "version": 1, "vocab": vocab.to_dict(),
                              "unit_source": src, "tokenizer": tok.describe(), "source": os.path.abspath(root)},
                             indent=1))
    return {"benchmark": bench, "items": len(lines), "files": len(paths), "output": out_dir,
            "tasks": sorted({"-".join(l) for l, _ in plan})}
