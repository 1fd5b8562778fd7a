"""Which language each sentence of a parallel story is rendered in: the interleaving designs of ``--mode random``
and ``--mode story-random`` (``streams.record_documents`` asks ``story_languages``).

Three designs (``design_of``):

* ``pair`` (``--pair A,B --p P``, the two-language shorthand and the default): ``random``: each sentence is B with
  probability P, else A; ``story-random``: one such draw per story. Every story holds both languages.
* ``langs`` (``--langs L1,..,Lk --probs p1,..,pk``; equal probabilities without ``--probs``): a story may hold any
  non-empty subset of the languages; ``random`` draws each sentence's language among those the story holds, with
  the probabilities renormalised over them; ``story-random`` draws once per story. The draw counts from the
  last language (a uniform u < pk gives Lk), so ``--langs A,B --probs 1-P,P`` renders exactly as ``--pair A,B
  --p P``.
* ``pairs`` (``--pairs A-B,A-C [--pair-weights wAB,wAC]``, the pivot design): each story first draws one pair
  among those whose two languages it holds (weights renormalised over them; equal weights by default; no draw
  when only one pair is eligible, so ``--pairs A-B`` renders as ``--pair A,B``), then renders as ``pair`` does
  with ``--p`` (default 0.5: both languages of the pair equally likely).

Every draw comes from the story's own generator (``streams.story_rng``: seed, input, line), so the output does
not depend on chunking or ``--workers``. ``Tally`` counts what the draws realised, for the manifest.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.errors import DataError

SUM_TOLERANCE = 1e-6            # --probs must sum to 1 within this


def parse_floats(text: Optional[str], flag: str) -> Optional[Tuple[float, ...]]:
    """``--probs`` / ``--pair-weights``: comma-separated numbers."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"{flag}: expected comma-separated numbers like 0.5,0.25,0.25, got {text!r}") from None


def parse_pairs(text: Optional[str]) -> Optional[Tuple[Tuple[str, str], ...]]:
    """``--pairs en-fr,en-de`` -> (("en", "fr"), ("en", "de"))."""
    if text is None:
        return None
    pairs = []
    for item in text.split(","):
        parts = item.split("-")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"--pairs: expected language pairs like en-fr,en-de, got {item!r} in {text!r}")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def design_of(opts) -> str:
    return "pairs" if opts.pairs else "langs" if opts.langs else "pair"


def design_languages(langs: Optional[Sequence[str]], pairs: Optional[Sequence[Tuple[str, str]]]) -> Tuple[str, ...]:
    """The languages a design names, in order of first appearance."""
    seen: Dict[str, None] = {}
    for l in list(langs or ()) + [l for pr in pairs or () for l in pr]:
        seen.setdefault(l, None)
    return tuple(seen)


def _weights(values: Optional[Sequence[float]], n: int, flag: str, of: str, must_sum_to_1: bool) -> Tuple[float, ...]:
    if values is None:
        return tuple([1.0 / n] * n)
    values = tuple(float(v) for v in values)
    if len(values) != n:
        raise DataError(f"{flag}: expected {n} numbers (one per {of}), got {len(values)}")
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise DataError(f"{flag}: expected non-negative numbers, got {list(values)}")
    total = sum(values)
    if must_sum_to_1 and abs(total - 1.0) > SUM_TOLERANCE:
        raise DataError(f"{flag}: expected probabilities summing to 1, got {list(values)} (sum {total:g})")
    if total <= 0:
        raise DataError(f"{flag}: expected at least one positive weight, got {list(values)}")
    return values if must_sum_to_1 else tuple(v / total for v in values)


def check_design(opts) -> None:
    """Validate the design options of a BuildOptions and set ``story_langs`` to the design's languages (called
    from ``BuildOptions.__post_init__`` before the languages are checked against the vocabulary)."""
    if opts.probs is not None and not opts.langs:
        raise DataError("--probs: needs --langs (the languages the probabilities are for)")
    if opts.pair_weights is not None and not opts.pairs:
        raise DataError("--pair-weights: needs --pairs")
    if not (opts.langs or opts.pairs):
        return
    given = "--langs" if opts.langs else "--pairs"
    if opts.langs and opts.pairs:
        raise DataError("--langs and --pairs: give one design (per-sentence draws among languages, or pairs)")
    if opts.mode not in ("random", "story-random"):
        raise DataError(f"{given}: only with --mode random or story-random, got --mode {opts.mode}")
    if opts.story_langs is not None:
        raise DataError(f"--pair and {given}: give one (--pair A,B is the two-language shorthand)")
    known = opts.vocab.languages
    if opts.langs:
        opts.langs = tuple(opts.langs)
        if len(set(opts.langs)) != len(opts.langs) or len(opts.langs) < 2:
            raise DataError(f"--langs: expected at least two distinct languages, got {list(opts.langs)}")
        for l in opts.langs:
            if l not in known:
                raise DataError(f"--langs: unknown language {l!r}; the vocabulary has {list(known)} (--languages)")
        opts.probs = _weights(opts.probs, len(opts.langs), "--probs", "--langs language", True)
    else:
        opts.pairs = tuple(tuple(pr) for pr in opts.pairs)
        for a, b in opts.pairs:
            for l in (a, b):
                if l not in known:
                    raise DataError(f"--pairs: {a}-{b} names unknown language {l!r}; the vocabulary has "
                                    f"{list(known)} (--languages)")
            if a == b:
                raise DataError(f"--pairs: {a}-{b} pairs a language with itself")
        if len(set(opts.pairs)) != len(opts.pairs):
            raise DataError(f"--pairs: a pair is given twice in {['-'.join(p) for p in opts.pairs]}")
        opts.pair_weights = _weights(opts.pair_weights, len(opts.pairs), "--pair-weights", "--pairs pair", False)
    opts.story_langs = design_languages(opts.langs, opts.pairs)


def draw_index(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each uniform ``u`` in [0, 1), index i with probability ``weights[i]`` (non-negative, summing to 1),
    counted from the last: u < weights[-1] gives the last index (two weights [1-p, p] draw as the shorthand's
    ``u < p``). A zero weight is never drawn (side='right' steps over its empty interval)."""
    k = len(weights)
    cum = np.cumsum(weights[::-1])
    cum[-1] = 2.0                   # rounding: every u < 1 falls inside
    return k - 1 - np.searchsorted(cum, u, side="right")


def pair_languages(n: int, mode: str, p: float, a: str, b: str, rng: np.random.Generator) -> List[str]:
    """Within a pair: per sentence (random) or per story (story-random), b with probability p, else a."""
    if mode == "random":
        pick = rng.random(n) < p
        return [b if x else a for x in pick]
    return [b if rng.random() < p else a] * n


def _pick_pair(held: Sequence[str], opts, rng: np.random.Generator, tally: "Tally") -> Tuple[str, str]:
    ok = [i for i, (a, b) in enumerate(opts.pairs) if a in held and b in held and opts.pair_weights[i] > 0]
    if not ok:
        raise DataError(f"the story holds {list(held)}: no pair of --pairs {['-'.join(p) for p in opts.pairs]} "
                        f"(with a positive weight) has both its languages in it")
    i = ok[0]
    if len(ok) > 1:
        w = np.array([opts.pair_weights[j] for j in ok])
        i = ok[int(draw_index(w / w.sum(), rng.random(1))[0])]
    a, b = opts.pairs[i]
    tally.count("stories_per_pair", f"{a}-{b}")
    return a, b


def story_languages(held: Sequence[str], n: int, opts, rng: np.random.Generator, tally: "Tally") -> List[str]:
    """The language of each of a story's ``n`` sentences, drawn among the languages it ``held`` (in
    ``opts.story_langs`` order) -- random and story-random modes of every design."""
    if opts.pairs:
        a, b = _pick_pair(held, opts, rng, tally)
        return pair_languages(n, opts.mode, opts.p, a, b, rng)
    if not opts.langs:
        a, b = opts.story_langs[0], opts.story_langs[-1]
        return pair_languages(n, opts.mode, opts.p, a, b, rng)
    prob = dict(zip(opts.langs, opts.probs))
    cand = [l for l in held if prob[l] > 0]
    if not cand:
        raise DataError(f"holds only {list(held)}, whose --probs are all 0")
    w = np.array([prob[l] for l in cand])
    if len(cand) < len(opts.langs):
        w = w / w.sum()             # renormalised over the languages this story holds
    idx = draw_index(w, rng.random(n if opts.mode == "random" else 1))
    return [cand[i] for i in idx] if opts.mode == "random" else [cand[int(idx[0])]] * n


class Tally:
    """What a build's draws realised: counts keyed by name, added up over chunks (a field of ``streams.Stats``).
    ``sentences_per_language`` and ``tokens_per_language`` (story sentences rendered in each language, and their
    tokens), ``stories_holding`` (stories that
    hold each language), ``switches_per_pair`` (language changes between consecutive sentences of a document,
    by the unordered pair "a-b" in vocabulary order), ``stories_per_pair`` (the ``pairs`` design's draws)."""

    KEYS = ("sentences_per_language", "tokens_per_language", "stories_holding", "switches_per_pair",
            "stories_per_pair")

    def __init__(self):
        self.counts: Dict[str, Dict[str, int]] = {k: {} for k in self.KEYS}

    def count(self, key: str, name: str, n: int = 1) -> None:
        d = self.counts[key]
        d[name] = d.get(name, 0) + n

    def add(self, other: "Tally") -> None:
        for key, d in other.counts.items():
            for name, n in d.items():
                self.count(key, name, n)


def check_held(opts, tally: Tally) -> None:
    """After every chunk: each language a ``langs`` / ``pairs`` design names must be held by some story."""
    if design_of(opts) == "pair":
        return
    held = tally.counts["stories_holding"]
    for l in opts.story_langs:
        if not held.get(l):
            flag = "--langs" if opts.langs else "--pairs"
            raise DataError(f"{flag}: no story of the inputs holds language {l!r} (the stories hold "
                            f"{sorted(held) or 'no language of the design'})")


def manifest_entry(opts, stats) -> Dict:
    """The manifest's ``interleave``: the design as asked and what it realised."""
    t = stats.tally.counts
    sent = {l: t["sentences_per_language"].get(l, 0) for l in opts.story_langs}
    total = sum(sent.values())
    return {
        "design": design_of(opts),
        "mode": opts.mode,
        "langs": list(opts.story_langs),
        "probs": list(opts.probs) if opts.langs else None,
        "pairs": ["-".join(p) for p in opts.pairs] if opts.pairs else None,
        "pair_weights": list(opts.pair_weights) if opts.pairs else None,
        "p": opts.p if opts.mode in ("random", "story-random") and not opts.langs else None,
        "realised": {
            "tokens_per_language": {l: t["tokens_per_language"].get(l, 0) for l in opts.story_langs},
            "sentences_per_language": sent,
            "sentence_share": {l: (c / total if total else 0.0) for l, c in sent.items()},
            "switch_rate_per_sentence_boundary": stats.switches / stats.boundaries if stats.boundaries else None,
            "switches_per_pair": dict(sorted(t["switches_per_pair"].items())),
            "stories_per_pair": dict(sorted(t["stories_per_pair"].items())),
            "stories_holding": {l: t["stories_holding"].get(l, 0) for l in opts.story_langs},
        },
    }
