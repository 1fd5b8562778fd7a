"""Benchmark files: the documented on-disk format (docs/evals.md), loading and validation.

A benchmark folder holds ``manifest.json`` (the unit vocabulary the units were made for, the same
``vocab`` block as a dataset manifest: offset, dedup, languages) and one or more ``*.jsonl`` files,
one item per line::

    {"id": "ssc-en-0", "benchmark": "sSC", "languages": ["en", "en"],
     "context": [12, 7, 99], "candidates": [[5, 6, 7], [40, 41]], "correct": 0}

* ``benchmark``: ``sSC`` | ``sTC`` (context + endings; ``languages`` = [context lang, ending lang], so
  ``["en", "fr"]`` is the cross-lingual EN→FR task), ``sBLIMP`` | ``sWUGGY`` (no context; ``languages``
  = [lang]), or ``align`` (parallel utterances: ``"utterances": [[en units], [fr units]]`` with
  ``languages`` = ["en", "fr"]; no candidates).
* ``context`` (optional for sBLIMP/sWUGGY): raw unit ids (0..codebook_size-1), not token ids.
* ``candidates``: >= 2 unit lists; ``correct``: the index of the right one (or a list of booleans with
  exactly one true).

Units become token ids with the manifest's vocabulary (``UnitVocab.encode_units``: offset, dedup).
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
from typing import Dict, List, Sequence, Tuple

from megaslm.fsutil import atomic_write_json
from megaslm.vocab import LANG_NONE, UnitVocab, VocabError

from evals.errors import EvalError

MANIFEST = "manifest.json"
FORMAT = "megaslm-evals"
FORMAT_VERSION = 1
PAIRWISE = ("sSC", "sTC", "sBLIMP", "sWUGGY")
ALIGN = "align"
KINDS = PAIRWISE + (ALIGN,)

# Column order of the paper's table (task keys as produced by ``task_key``).
MONOLINGUAL = ["sSC-EN", "sSC-FR", "sTC-EN", "sTC-FR"]
CROSSLINGUAL = ["sSC EN→FR", "sSC FR→EN", "sTC EN→FR", "sTC FR→EN"]
SYNTAX_LEXICON = ["sBLIMP", "sWUGGY"]


def chance_percent(task_result: Dict) -> float:
    """A scored task's chance level in %: its recorded ``chance`` (mean of 1/candidates over the items);
    results written before that field existed are taken as pairs (the paper's benchmarks), 50 %."""
    return 100.0 * task_result.get("chance", 0.5)


@dataclasses.dataclass
class Item:
    id: str
    benchmark: str
    languages: Tuple[str, ...]
    context: List[int]                 # raw units
    candidates: List[List[int]]        # raw units (pairwise kinds)
    correct: int = -1
    utterances: List[List[int]] = dataclasses.field(default_factory=list)  # align kind
    where: str = ""                    # "file:line" for error messages

    @property
    def task(self) -> str:
        return task_key(self.benchmark, self.languages)


def task_key(benchmark: str, languages: Sequence[str]) -> str:
    langs = [l.upper() for l in languages]
    if benchmark == ALIGN:
        return "align " + "-".join(langs)
    if benchmark in ("sBLIMP", "sWUGGY"):
        return benchmark if langs in ([], ["EN"]) else f"{benchmark}-{'-'.join(langs)}"
    if len(langs) == 2 and langs[0] == langs[1]:
        return f"{benchmark}-{langs[0]}"
    return f"{benchmark} {langs[0]}→{langs[1]}"


def pair_tasks(languages: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(monolingual, cross-lingual) sSC / sTC task keys of every ordered pair of ``languages`` (the sets of an
    N-language ``data_tools world``), in the paper's column order: for en, fr exactly MONOLINGUAL, CROSSLINGUAL."""
    mono = [task_key(k, [l, l]) for k in ("sSC", "sTC") for l in languages]
    cross = [task_key(k, [a, b]) for k in ("sSC", "sTC") for a, b in itertools.permutations(languages, 2)]
    return mono, cross


@dataclasses.dataclass
class Benchmark:
    """All items of one folder (or file), grouped by task, with the vocabulary they were made for."""
    path: str
    vocab: UnitVocab
    items: List[Item]

    def tasks(self) -> Dict[str, List[Item]]:
        out: Dict[str, List[Item]] = {}
        for it in self.items:
            out.setdefault(it.task, []).append(it)
        return out


# ------------------------------------------------------------------------------------------------
def read_vocab_manifest(folder: str) -> UnitVocab:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise EvalError(f"{path}: benchmark manifest not found (every benchmark folder needs one)") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(m, dict) or "vocab" not in m:
        raise EvalError(f"{path}: field 'vocab' missing")
    if m.get("format", FORMAT) != FORMAT or m.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise EvalError(f"{path}: format {m.get('format')!r} v{m.get('version')!r}; expected {FORMAT!r} v{FORMAT_VERSION}")
    try:
        return UnitVocab.from_dict(m["vocab"], where=f"{path}:vocab")
    except (VocabError, TypeError) as e:
        raise EvalError(f"{path}:vocab: {e}") from None


def write_manifest(folder: str, vocab: UnitVocab, **extra) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MANIFEST)
    atomic_write_json(path, {"format": FORMAT, "version": FORMAT_VERSION, "vocab": vocab.to_dict(), **extra}, indent=1)
    return path


def _units(value, vocab: UnitVocab, where: str, fld: str, allow_empty: bool) -> List[int]:
    if not isinstance(value, list):
        raise EvalError(f"{where}: field '{fld}': expected a list of unit ids, got {type(value).__name__}")
    if not value and not allow_empty:
        raise EvalError(f"{where}: field '{fld}': empty unit list")
    C = vocab.codebook_size
    for j, u in enumerate(value):
        if isinstance(u, bool) or not isinstance(u, int):
            raise EvalError(f"{where}: field '{fld}[{j}]': expected an integer unit id, got {u!r}")
        if not 0 <= u < C:
            raise EvalError(f"{where}: field '{fld}[{j}]': unit {u} outside the vocabulary (codebook 0..{C - 1})")
    return value


def parse_item(obj, vocab: UnitVocab, where: str) -> Item:
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: expected a JSON object per line")
    iid = obj.get("id")
    if not isinstance(iid, (str, int)) or iid == "":
        raise EvalError(f"{where}: field 'id': missing or not a string")
    where = f"{where}: item {str(iid)!r}"
    known = {"id", "benchmark", "languages", "context", "candidates", "correct", "utterances", "meta"}
    extra = set(obj) - known
    if extra:
        raise EvalError(f"{where}: unknown field(s) {sorted(extra)}; expected {sorted(known)}")
    kind = obj.get("benchmark")
    if kind not in KINDS:
        raise EvalError(f"{where}: field 'benchmark': {kind!r} is not one of {list(KINDS)}")
    langs = obj.get("languages")
    if not isinstance(langs, list) or not all(isinstance(l, str) for l in langs):
        raise EvalError(f"{where}: field 'languages': expected a list of language names")
    need_langs = 1 if kind in ("sBLIMP", "sWUGGY") else 2
    if len(langs) != need_langs:
        raise EvalError(f"{where}: field 'languages': {kind} expects {need_langs} language(s), got {langs}")
    for l in langs:
        if l not in vocab.languages:
            raise EvalError(f"{where}: field 'languages': {l!r} not in the manifest's languages {list(vocab.languages)}")
    if kind == ALIGN:
        utt = obj.get("utterances")
        if not isinstance(utt, list) or len(utt) != 2:
            raise EvalError(f"{where}: field 'utterances': expected two unit lists (one per language)")
        utts = [_units(u, vocab, where, f"utterances[{k}]", False) for k, u in enumerate(utt)]
        return Item(str(iid), kind, tuple(langs), [], [], -1, utts, where)
    ctx = _units(obj.get("context", []), vocab, where, "context", True)
    if kind in ("sSC", "sTC") and not ctx:
        raise EvalError(f"{where}: field 'context': {kind} items need a non-empty context")
    cands = obj.get("candidates")
    if not isinstance(cands, list) or len(cands) < 2:
        raise EvalError(f"{where}: field 'candidates': expected a list of at least two unit lists")
    cands = [_units(c, vocab, where, f"candidates[{k}]", False) for k, c in enumerate(cands)]
    corr = obj.get("correct")
    if isinstance(corr, list):
        if len(corr) != len(cands) or not all(isinstance(b, bool) for b in corr):
            raise EvalError(f"{where}: field 'correct': a list form needs one boolean per candidate")
        if sum(corr) != 1:
            raise EvalError(f"{where}: field 'correct': exactly one candidate must be correct, got {sum(corr)}")
        corr = corr.index(True)
    if isinstance(corr, bool) or not isinstance(corr, int):
        raise EvalError(f"{where}: field 'correct': expected the index of the one correct candidate, got {corr!r}")
    if not 0 <= corr < len(cands):
        raise EvalError(f"{where}: field 'correct': index {corr} outside 0..{len(cands) - 1}")
    return Item(str(iid), kind, tuple(langs), ctx, cands, corr, [], where)


def read_items(path: str, vocab: UnitVocab) -> List[Item]:
    try:
        f = open(path)
    except FileNotFoundError:
        raise EvalError(f"{path}: benchmark file not found") from None
    items = []
    with f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{ln}: invalid JSON ({e.msg})") from None
            items.append(parse_item(obj, vocab, f"{path}:{ln}"))
    if not items:     # scored, it would be a table of dashes and exit 0
        raise EvalError(f"{path}: empty benchmark file (no items); expected one JSON item per line (docs/evals.md)")
    return items


def load_benchmark(path: str, max_items_per_task: int = 0) -> Benchmark:
    """A benchmark folder (manifest.json + *.jsonl) or one .jsonl file (manifest.json beside it)."""
    if os.path.isdir(path):
        folder = path
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise EvalError(f"{path}: no *.jsonl benchmark files in this folder")
    elif os.path.isfile(path):
        folder, files = os.path.dirname(os.path.abspath(path)), [path]
    else:
        raise EvalError(f"{path}: benchmark file or folder not found")
    vocab = read_vocab_manifest(folder)
    items: List[Item] = []
    seen: Dict[Tuple[str, str], str] = {}
    for fp in files:
        for it in read_items(fp, vocab):
            key = (it.task, it.id)
            if key in seen:
                raise EvalError(f"{it.where}: duplicate id (first at {seen[key]})")
            seen[key] = it.where
            items.append(it)
    if max_items_per_task:
        counts: Dict[str, int] = {}
        kept = []
        for it in items:
            counts[it.task] = counts.get(it.task, 0) + 1
            if counts[it.task] <= max_items_per_task:
                kept.append(it)
        items = kept
    return Benchmark(path, vocab, items)


def check_vocab(bench_vocab: UnitVocab, model_vocab: UnitVocab, where: str) -> None:
    """The benchmark's units must map exactly as the checkpoint's training data did."""
    if bench_vocab != model_vocab:
        diffs = [f"{k}: benchmark {getattr(bench_vocab, k)!r} vs checkpoint {getattr(model_vocab, k)!r}"
                 for k in bench_vocab.differences(model_vocab)]
        raise EvalError(f"{os.path.join(where, MANIFEST) if os.path.isdir(where) else where}: vocabulary does not "
                        f"match the checkpoint's ({'; '.join(diffs)})")


def token_languages(vocab: UnitVocab, toks: Sequence[int], start: int, languages: Sequence[str]) -> List[int]:
    """Side-channel language id of every token of an encoded utterance, for a model with
    ``model.language_embedding``: tokens before ``start`` (the context) get ``languages[0]``, the
    continuation ``languages[-1]``; special tokens (bos, eod, tags, separators: ids below
    ``vocab.offset``) get LANG_NONE -- exactly as data_tools writes the training side channel."""
    ctx, cont = vocab.lang_id(languages[0]), vocab.lang_id(languages[-1])
    return [LANG_NONE if t < vocab.offset else (ctx if i < start else cont) for i, t in enumerate(toks)]


def encode(vocab: UnitVocab, context: List[int], continuation: List[int], add_bos: bool) -> Tuple[List[int], int]:
    """(token ids of [bos] + context + continuation, index of the first continuation token).

    The utterance is encoded as a whole (so dedup may merge a repeat across the boundary); the
    continuation is whatever the context's encoding does not cover.
    """
    head = [vocab.bos_id] if add_bos else []
    ctx = vocab.encode_units(context)
    full = vocab.encode_units(list(context) + list(continuation))
    return head + full, len(head) + len(ctx)
