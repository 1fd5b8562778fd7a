"""Records -> documents: unit mapping, deduplication, cross-lingual interleaving, packing.

A document is one utterance, or one chunk of a story: sentences appended whole, a new document
started when the next sentence would pass ``target_length`` (a single longer sentence stays whole).
Every document ends with eod (language id 0); bos (optional) starts it; with ``vocab.lang_tags`` a
language tag precedes each sentence whose language differs from the previous one in the document;
with ``vocab.sentence_sep`` a separator lies between sentences. Tags/separators have language id 0.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from megaslm.vocab import FRAME_RATES, LANG_NONE, UnitVocab

from data_tools.common import dedup_units
from data_tools.errors import DataError
from data_tools.formats import MAX_LINE_BYTES, Record
from data_tools.interleave import Tally, check_design, story_languages

MODES = ("mono", "random", "story-random", "alternate")
RANDOM_MODES = ("random", "story-random")   # modes that use --p (and --langs / --pairs: data_tools.interleave)


@dataclasses.dataclass
class BuildOptions:
    vocab: UnitVocab = dataclasses.field(default_factory=UnitVocab)
    mode: str = "mono"                 # mono | random | story-random | alternate
    p: float = 0.5                     # random / story-random: probability of story_langs[1] per sentence / story
    seed: int = 0
    target_length: int = 2048          # max tokens per story document (0 = never split)
    lang: Optional[str] = None         # mono: language taken from stories; default for utterances
    story_langs: Optional[Tuple[str, ...]] = None   # the aligned pair (default: vocab.languages[:2]); with
    #                                                   langs / pairs: set to the design's languages
    langs: Optional[Tuple[str, ...]] = None         # --langs: per-sentence / per-story draws among N languages
    probs: Optional[Tuple[float, ...]] = None       # --probs: one per langs (default equal), summing to 1
    pairs: Optional[Tuple[Tuple[str, str], ...]] = None   # --pairs: one pair drawn per story (pivot design)
    pair_weights: Optional[Tuple[float, ...]] = None      # --pair-weights: one per pair (default equal)
    add_bos: bool = False
    source_type: str = "mimi"          # a key of megaslm.vocab.FRAME_RATES (hours accounting)
    frame_rate: Optional[float] = None
    bpe_model: Optional[str] = None
    skip_bad: bool = False
    allow_gaps: bool = False           # .npy sidecars: records may skip units (never overlap)
    workers: int = 1
    chunk_size: int = 1024
    max_line_bytes: int = MAX_LINE_BYTES   # a longer line of a line input is refused (bounds a chunk's bytes)
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"--mode: expected one of {MODES}, got {self.mode!r}")
        if not 0.0 <= float(self.p) <= 1.0:
            raise DataError(f"--p: expected a probability in [0, 1], got {self.p}")
        check_design(self)              # --langs / --pairs: sets story_langs
        if self.story_langs is None:
            if len(self.vocab.languages) < 2 and self.mode != "mono":
                raise DataError("interleaving needs two languages in the vocabulary")
            self.story_langs = tuple(self.vocab.languages[:2]) if len(self.vocab.languages) >= 2 \
                else tuple(self.vocab.languages)
            if self.mode == "mono" and self.lang is not None and self.lang not in self.story_langs:
                # --mode mono --lang de on an N-language world: read that language alone (the default pair is
                # kept otherwise, so existing builds and their manifests stay byte-identical)
                self.story_langs = (self.lang,)
        self.story_langs = tuple(self.story_langs)
        if self.lang is None:
            self.lang = self.story_langs[0]
        for l in self.story_langs + (self.lang,):
            if l not in self.vocab.languages:
                raise DataError(f"--lang/--pair: unknown language {l!r}; the vocabulary has "
                                f"{list(self.vocab.languages)} (--languages)")
        if self.frame_rate is None:
            if self.source_type not in FRAME_RATES:
                raise DataError(f"--source-type: unknown {self.source_type!r}; expected one of "
                                f"{sorted(FRAME_RATES)} or give --frame-rate")
            self.frame_rate = FRAME_RATES[self.source_type]
        if not float(self.frame_rate) > 0:
            raise DataError(f"--frame-rate: expected > 0, got {self.frame_rate}")
        if self.target_length < 0:
            raise DataError("--target-length: expected >= 0")
        if self.workers < 1 or self.chunk_size < 1:
            raise DataError("--workers and --chunk-size must be >= 1")
        if self.max_line_bytes < 2:
            raise DataError(f"--max-line-bytes: expected at least 2, got {self.max_line_bytes}")


class Encoder:
    """Units -> token ids (offset, optional dedup, optional unit BPE)."""

    def __init__(self, vocab: UnitVocab, bpe_model: Optional[str] = None):
        self.vocab = vocab
        self.bpe = None
        if bpe_model:
            from data_tools.bpe import UnitBPE
            self.bpe = UnitBPE.load(bpe_model)

    def __call__(self, units: np.ndarray) -> np.ndarray:
        if self.vocab.dedup:
            units = dedup_units(units)
        if self.bpe is not None:
            return self.bpe.encode(units) + self.vocab.offset
        return units + self.vocab.offset


@dataclasses.dataclass
class Stats:
    tokens: int = 0
    documents: int = 0
    sentences: int = 0
    switches: int = 0                   # language changes between consecutive sentences of a document
    boundaries: int = 0                 # sentence boundaries inside documents
    per_language: Dict[str, int] = dataclasses.field(default_factory=dict)   # incl. "none"
    per_source: Dict[str, int] = dataclasses.field(default_factory=dict)
    frames: Dict[str, int] = dataclasses.field(default_factory=dict)
    units_in: int = 0                   # units before dedup / BPE
    bad: int = 0
    tally: Tally = dataclasses.field(default_factory=Tally)   # stories: what the interleaving draws realised

    def add(self, other: "Stats") -> None:
        for f in ("tokens", "documents", "sentences", "switches", "boundaries", "units_in", "bad"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("per_language", "per_source", "frames"):
            d = getattr(self, f)
            for k, v in getattr(other, f).items():
                d[k] = d.get(k, 0) + v
        self.tally.add(other.tally)


def story_rng(seed: int, input_index: int, line: int) -> np.random.Generator:
    """Each story's own generator: the output does not depend on chunking or worker count."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(input_index), int(line)]))


def choose_languages(n: int, opts: BuildOptions, rng: np.random.Generator, held: List[str],
                     tally: Tally) -> List[str]:
    """The language of each of a story's ``n`` sentences; ``held``: the story's languages (in ``story_langs``
    order). Random modes: ``data_tools.interleave`` (story-random: one draw per story, from the same per-story
    generator)."""
    a, b = opts.story_langs[0], opts.story_langs[-1]
    if opts.mode == "mono":
        return [opts.lang] * n
    if opts.mode in RANDOM_MODES:
        return story_languages(held, n, opts, rng, tally)
    start = int(rng.integers(2))
    return [(a, b)[(start + i) % 2] for i in range(n)]


def _story_sentences(rec: Record, opts: BuildOptions, enc: "Encoder", rng: np.random.Generator, stats: Stats):
    """A story's sentences in the languages drawn for them: [(language, token ids, units in, frames)]."""
    held = list(rec.sentences)
    if opts.mode == "mono" and opts.lang not in held:     # was a KeyError (a traceback)
        raise DataError(f"--mode mono --lang {opts.lang}: stories are read in the languages {held} (--pair); "
                        f"expected --pair naming {opts.lang!r}")
    n = len(rec.sentences[held[0]])
    langs = choose_languages(n, opts, rng, held, stats.tally)
    sents = []
    for i, l in enumerate(langs):
        u = rec.sentences[l][i]
        sents.append((l, enc(u), int(u.size), int(u.size)))
    for l in held:
        stats.tally.count("stories_holding", l)
    for l, ids, _, _ in sents:
        stats.tally.count("sentences_per_language", l)
        stats.tally.count("tokens_per_language", l, int(ids.size))
    return sents


Document = Tuple[np.ndarray, np.ndarray]   # (token ids, language ids)


def record_documents(rec: Record, source: str, opts: BuildOptions, enc: Encoder,
                     rng: Optional[np.random.Generator], stats: Stats) -> List[Document]:
    vocab = opts.vocab
    if rec.kind == "utt":
        # an utterance is one document in its own language in every mode, so one build can mix
        # utterance files with parallel stories (issue 13 item 7)
        sents = [(rec.lang, enc(rec.units), int(rec.units.size), rec.frames)]
    else:
        sents = _story_sentences(rec, opts, enc, rng, stats)

    docs: List[Document] = []
    parts: List[Tuple[np.ndarray, int]] = []   # (ids, lang id)
    state = {"len": 0, "prev": None, "n": 0}

    def reset():
        parts.clear()
        state.update(len=(1 if opts.add_bos else 0) + 1, prev=None, n=0)
        if opts.add_bos:
            parts.append((np.array([vocab.bos_id]), LANG_NONE))

    def flush():
        parts.append((np.array([vocab.eod_id]), LANG_NONE))
        ids = np.concatenate([p for p, _ in parts])
        lid = np.concatenate([np.full(p.size, l, dtype=np.uint8) for p, l in parts])
        docs.append((ids, lid))
        stats.documents += 1

    reset()
    for lang, ids, n_in, frames in sents:
        def overhead(prev, n):
            return (1 if vocab.sentence_sep and n else 0) + (1 if vocab.lang_tags and lang != prev else 0)
        need = overhead(state["prev"], state["n"]) + ids.size
        if state["n"] and opts.target_length and state["len"] + need > opts.target_length:
            flush()
            reset()
            need = overhead(None, 0) + ids.size
        if vocab.sentence_sep and state["n"]:
            parts.append((np.array([vocab.sep_id]), LANG_NONE))
        if state["n"]:
            stats.boundaries += 1
            if lang != state["prev"]:
                stats.switches += 1
                a, b = sorted((lang, state["prev"]), key=vocab.languages.index)
                stats.tally.count("switches_per_pair", f"{a}-{b}")
        if vocab.lang_tags and lang != state["prev"]:
            parts.append((np.array([vocab.lang_tag_id(lang)]), LANG_NONE))
        parts.append((ids, vocab.lang_id(lang)))
        state["len"] += need
        state["prev"] = lang
        state["n"] += 1
        stats.sentences += 1
        stats.units_in += n_in
        stats.per_language[lang] = stats.per_language.get(lang, 0) + int(ids.size)
        stats.frames[lang] = stats.frames.get(lang, 0) + int(frames)
    flush()
    total = sum(int(d[0].size) for d in docs)
    unit_tokens = sum(int(s[1].size) for s in sents)
    stats.tokens += total
    stats.per_language["none"] = stats.per_language.get("none", 0) + total - unit_tokens
    stats.per_source[source] = stats.per_source.get(source, 0) + total
    return docs
