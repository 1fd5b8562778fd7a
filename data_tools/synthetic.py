"""A synthetic, learnable, sentence-aligned EN-FR unit corpus, built with the real pipeline.

EN sentences follow a sparse Markov chain over the units (each unit has 3 likely successors);
FR sentence i is EN sentence i through a fixed unit permutation (so FR is a different sparse chain,
and an interleaved stream rewards knowing the mapping); ``make_stories(languages=...)`` adds further aligned
languages the same way, each through its own permutation. A small LM's loss falls well below log(C).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from megaslm.vocab import UnitVocab, lang_prefix, manifest_path

from data_tools.build import build_dataset
from data_tools.common import OutputFiles, atomic_write_text
from data_tools.streams import BuildOptions


def make_stories(num_stories: int, codebook_size: int, seed: int = 0, min_sentences: int = 3,
                 max_sentences: int = 8, min_len: int = 6, max_len: int = 24,
                 languages: Sequence[str] = ("en", "fr")):
    """Yield story dicts ``{"id", "en": [[units]...], "fr": [[units]...]}``: one key per name of
    ``languages`` (at least two), every one sentence-aligned with the first (the same stories as the default
    ("en", "fr") for the first two; the others' permutations come from a generator of their own)."""
    if len(languages) < 2 or len(set(languages)) != len(languages):
        raise ValueError(f"make_stories: expected at least two distinct languages, got {list(languages)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FFEE]))
    C = codebook_size
    succ = rng.integers(0, C, size=(C, 3))                   # EN chain: 3 successors per unit
    probs = np.array([0.6, 0.3, 0.1])
    perm = rng.permutation(C)                                  # EN unit -> FR unit
    starts = rng.integers(0, C, size=max(4, C // 8))           # sentences start from a few units
    extra = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FFEE, 1]))
    perms = [perm] + [extra.permutation(C) for _ in languages[2:]]   # unit maps of the 2nd, 3rd, ... language
    for s in range(num_stories):
        n = int(rng.integers(min_sentences, max_sentences + 1))
        en, others = [], [[] for _ in perms]
        for _ in range(n):
            L = int(rng.integers(min_len, max_len + 1))
            choice = rng.choice(3, size=L, p=probs)
            u = np.empty(L, dtype=np.int64)
            u[0] = starts[int(rng.integers(len(starts)))]
            for i in range(1, L):
                u[i] = succ[u[i - 1], choice[i]]
            en.append(u.tolist())
            for out, pm in zip(others, perms):
                out.append(pm[u].tolist())
        yield {"id": f"story-{s:06d}", languages[0]: en, **dict(zip(languages[1:], others))}


def write_demo_corpus(out_dir: str, seed: int = 0, num_stories: int = 600, codebook_size: int = 128,
                      vocab: Optional[UnitVocab] = None, p: float = 0.5, target_length: int = 2048,
                      workers: int = 1) -> Dict[str, str]:
    """Write ``out_dir/stories.jsonl`` and build three datasets from it with the real pipeline.

    Returns ``{"en": prefix, "fr": prefix, "enfr_interleaved": prefix}`` (monolingual EN, monolingual
    FR, per-sentence random interleaving with probability ``p``). The vocabulary defaults to
    ``UnitVocab(codebook_size=codebook_size)`` (en, fr; no tags, no separator, no dedup).
    """
    vocab = vocab or UnitVocab(codebook_size=codebook_size)
    if vocab.codebook_size != codebook_size:
        raise ValueError("vocab.codebook_size and codebook_size differ")
    common = dict(vocab=vocab, seed=seed, target_length=target_length, workers=workers, progress=False)
    out = {
        "en": (os.path.join(out_dir, "en"), BuildOptions(mode="mono", lang="en", **common)),
        "fr": (os.path.join(out_dir, "fr"), BuildOptions(mode="mono", lang="fr", **common)),
        "enfr_interleaved": (os.path.join(out_dir, "enfr_interleaved"),
                             BuildOptions(mode="random", p=p, **common)),
    }
    # all or nothing: if a write fails (a full disk), what this call wrote is removed again
    with OutputFiles("the demo corpus") as files:
        files.makedirs(out_dir)
        stories = os.path.join(out_dir, "stories.jsonl")
        with files.open(stories) as f:
            for st in make_stories(num_stories, codebook_size, seed=seed):
                f.write(json.dumps(st, separators=(",", ":")) + "\n")
        for name, (prefix, opts) in out.items():
            build_dataset([f"demo_stories={stories}"], prefix, opts)
            files.placed(prefix + ".bin", prefix + ".idx", lang_prefix(prefix) + ".bin", lang_prefix(prefix) + ".idx",
                         manifest_path(prefix))
    return {k: v[0] for k, v in out.items()}


def prepare_demo_corpus(out_dir: str, seed: int = 0, num_stories: int = 600, codebook_size: int = 128,
                        log=None) -> Dict[str, str]:
    """``write_demo_corpus`` into ``out_dir`` once, however many processes ask at the same time (every rank of a
    launch does): the first to take ``out_dir/.lock`` builds it, the others then read ``prefixes.json``
    (written whole or not at all). Returns the prefixes; ``log(message)`` is told when this call built them.
    Used by the launchers for ``data.demo`` and by the tests that train on the demo corpus."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    done = os.path.join(out_dir, "prefixes.json")
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            prefixes = write_demo_corpus(out_dir, seed=seed, num_stories=num_stories, codebook_size=codebook_size)
            atomic_write_text(done, json.dumps(prefixes))
            if log is not None:
                log(f"built the demo corpus in {out_dir}: {', '.join(sorted(prefixes))}")
    with open(done) as f:
        return json.load(f)
