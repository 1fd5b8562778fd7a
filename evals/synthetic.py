"""A tiny synthetic benchmark folder in the documented format (tests, README example).

From a stories file (JSONL lines ``{"id", "en": [[units], ...], "fr": [[units], ...]}``, sentence-
aligned; e.g. the ``stories.jsonl`` the demo corpus is built from) it writes, per language pair:

* ``sSC``: context = the story's first sentences, correct = its next sentence, wrong = a sentence of
  the same length of uniformly random units (wrong "by construction": it follows no learned rule);
* ``sTC``: as sSC, wrong = the next sentence of another story;
* cross-lingual ``sSC``/``sTC`` (context in one language, endings in the other);
* ``sWUGGY`` (EN: a real sentence vs its units shuffled) and ``sBLIMP`` (EN: a sentence vs the same
  with two halves swapped);
* ``align`` (EN/FR sentence pairs).
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, Iterable, List, Optional

from megaslm.fsutil import atomic_write_text
from megaslm.vocab import UnitVocab

from evals.benchmarks import write_manifest


def read_stories(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def build_benchmark(stories: List[Dict], out_dir: str, vocab: UnitVocab, items_per_task: int = 50,
                    context_sentences: int = 2, seed: int = 0, max_context_units: int = 60,
                    pairs: Iterable = (("en", "en"), ("fr", "fr"), ("en", "fr"), ("fr", "en"))) -> Dict[str, str]:
    """Write ``out_dir/{manifest.json, cloze.jsonl, swuggy.jsonl, sblimp.jsonl, align.jsonl}``."""
    rng = random.Random(seed)
    C = vocab.codebook_size
    usable = [s for s in stories if len(s["en"]) > context_sentences]
    if len(usable) < 2:
        raise ValueError("need at least two stories with more than context_sentences sentences")
    write_manifest(out_dir, vocab, source="evals.synthetic")
    files = {}

    def ctx_of(st, lang):
        units = [u for sent in st[lang][:context_sentences] for u in sent]
        return units[-max_context_units:]

    cloze = []
    for kind in ("sSC", "sTC"):
        for a, b in pairs:
            for n in range(items_per_task):
                st = usable[(n * 7 + len(cloze)) % len(usable)]
                other = usable[(usable.index(st) + 1 + rng.randrange(len(usable) - 1)) % len(usable)]
                right = st[b][context_sentences]
                if kind == "sSC":
                    wrong = [rng.randrange(C) for _ in right]
                else:
                    wrong = other[b][min(context_sentences, len(other[b]) - 1)]
                cands, correct = ([right, wrong], 0) if rng.random() < 0.5 else ([wrong, right], 1)
                cloze.append({"id": f"{kind}-{a}-{b}-{n}", "benchmark": kind, "languages": [a, b],
                              "context": ctx_of(st, a), "candidates": cands, "correct": correct})
    files["cloze"] = _write(out_dir, "cloze.jsonl", cloze)
    sents = [s for st in stories for s in st["en"] if len(s) >= 4]
    wug, blimp = [], []
    for n in range(items_per_task):
        s = sents[(n * 13) % len(sents)]
        sh = list(s)
        rng.shuffle(sh)
        h = len(s) // 2
        sw = s[h:] + s[:h]
        wug.append({"id": f"wug-{n}", "benchmark": "sWUGGY", "languages": ["en"], "candidates": [s, sh], "correct": 0})
        blimp.append({"id": f"blimp-{n}", "benchmark": "sBLIMP", "languages": ["en"], "candidates": [sw, s], "correct": 1})
    files["swuggy"] = _write(out_dir, "swuggy.jsonl", wug)
    files["sblimp"] = _write(out_dir, "sblimp.jsonl", blimp)
    al = []
    for n, st in enumerate(stories[:items_per_task]):
        al.append({"id": f"align-{n}", "benchmark": "align", "languages": ["en", "fr"],
                   "utterances": [st["en"][0], st["fr"][0]]})
    files["align"] = _write(out_dir, "align.jsonl", al)
    return files


def _write(d: str, name: str, rows: List[Dict]) -> str:
    p = os.path.join(d, name)
    atomic_write_text(p, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build a synthetic benchmark folder from a stories JSONL")
    p.add_argument("stories")
    p.add_argument("out_dir")
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build_benchmark(read_stories(a.stories), a.out_dir, UnitVocab(codebook_size=a.codebook_size), a.items, seed=a.seed)
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
