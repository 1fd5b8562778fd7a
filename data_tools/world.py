"""A synthetic "spoken" world in 2 (EN, FR) or N languages that share concepts but not pronunciations.

The demo sweep (``python launchers/sweep.py``) trains on it to show the paper's interleaving effect in
miniature; nothing in it favours one training arm: both arms train on the SAME parallel stories, and
only the data build decides how a story is rendered (whole story in one language, or a language per
sentence).

The world (all drawn from one seed):

* ``concepts``: ``topics x concepts_per_topic`` topic words plus ``characters`` protagonist names.
  Each concept has a *word* in every language: a sequence of 2-4 units (of ``codebook_size``),
  drawn independently per language (EN "dog" and FR "chien" share no units by design).
* function words: a few short unit sequences per language (EN and FR again independent), used as a
  per-language grammar: ``sentence = F0 hero F1 topic-word F2 topic-word [F3 topic-word]``.
* a story: one topic and one hero (a character); every sentence names the hero first and then
  draws its content words from the topic's concepts (Zipf-weighted). Sentence ``i`` of the French
  side is sentence ``i`` of the English side, word for word, in French words: sentence-aligned
  parallel stories.
* speech-like noise: each unit is replaced by a random unit with probability ``noise``.

N languages (``--languages en,fr,de,...``, 2 to ``MAX_LANGUAGES``): every language gets its own lexicon
(content and function words; no word form is shared by two languages or two words) and its own word order
(a permutation of a sentence's 4 slots, hero + up to 3 topic words, distinct for every language; up to 6
languages they also differ on 3-word sentences); the concepts, the stories and everything drawn about them
are shared. Nothing else tells two languages apart. The files then change as follows: stories hold one field
per language (the N-language story format of ``data_tools build --langs / --pairs``), and ``bench/`` holds
one file per set: ``stc_<ctx>_<end>.jsonl`` and ``ssc_<ctx>_<end>.jsonl`` for every ordered pair of languages
(context language, ending language; the diagonal ``stc_de_de`` is monolingual) and ``align_<a>_<b>.jsonl``
for every unordered pair (``a`` before ``b`` in ``--languages`` order), listed in the manifest's ``sets``.
Without ``--languages`` the world is the two-language one of before, byte for byte (EN and FR share one
word order; ``bench/cloze.jsonl`` and ``bench/align.jsonl``); ``--languages en,fr`` is a different world
(its own word orders, per-set files).

Files written to ``out_dir``:

* ``stories.jsonl``: the training pool, parallel stories ``{"id", "en": [[units]...], "fr": [...]}``
  (the data_tools story format: build it with ``--mode random`` for per-sentence interleaving, with
  ``--mode story-random`` for the whole-story-language baseline);
* ``valid.jsonl``: ``valid_stories`` held-out parallel stories in the same format (a random stream of
  their own: the training pool never contains them), for a held-out loss that is the same for every arm;
* ``bench/``: held-out benchmarks in the evals format (docs/evals.md), from stories the training pool
  never contains: ``sTC`` (topic cloze: the right next sentence vs one from a story of another topic,
  same hero), ``sSC`` (story cloze: the right next sentence vs one with another hero, same topic),
  each in EN, FR, EN->FR and FR->EN, and ``align`` (parallel EN/FR sentences);
* ``world.json``: the lexicon and the parameters (for inspection; nothing reads it back).
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data_tools.common import OutputFiles
from data_tools.errors import DataError

LANGS = ("en", "fr")            # the default world's languages
SLOTS = 4                       # concepts of a sentence at most: the hero + 2-3 topic words
MAX_LANGUAGES = 24              # one distinct word order each: the 4! orders of a sentence's slots
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}\Z")     # file names use them: stc_<ctx>_<end>.jsonl


def parse_languages(text: str) -> Tuple[str, ...]:
    """``--languages en,fr,de`` -> ("en", "fr", "de"), checked (DataError: one line)."""
    names = tuple(text.split(","))
    for n in names:
        if not _NAME.match(n):
            raise DataError(f"world: --languages: {n!r} in {text!r} is not a language name (expected a lowercase "
                            f"letter, then up to 7 lowercase letters or digits)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"world: --languages: {dup[0]!r} given twice in {text!r}; expected distinct languages")
    if not 2 <= len(names) <= MAX_LANGUAGES:
        raise DataError(f"world: --languages: expected 2 to {MAX_LANGUAGES} languages (one distinct word order "
                        f"each), got {len(names)}")
    return names


def word_orders(seed: int, n: int) -> List[List[int]]:
    """``n`` distinct orders of a sentence's slots (its concepts' surface positions), drawn from the seed;
    the first 6 also differ on 3-concept sentences (the order restricted to slots 0-2)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, 1]))
    perms = list(itertools.permutations(range(SLOTS)))
    perms = [perms[int(i)] for i in rng.permutation(len(perms))]
    seen: Dict[Tuple[int, ...], int] = {}
    rank = []
    for p in perms:
        short = tuple(j for j in p if j < SLOTS - 1)
        rank.append(seen.get(short, 0))
        seen[short] = rank[-1] + 1
    keep = sorted(range(len(perms)), key=lambda i: rank[i])[:n]     # stable: the draw's order within a rank
    return [list(perms[i]) for i in keep]


@dataclass
class WorldSpec:
    seed: int = 0
    codebook_size: int = 128
    topics: int = 8
    concepts_per_topic: int = 8
    characters: int = 12
    function_words: int = 4
    stories: int = 4000
    min_sentences: int = 4
    max_sentences: int = 8
    noise: float = 0.02
    valid_stories: int = 200      # held-out parallel stories (valid.jsonl) for a held-out loss
    bench_items: int = 200        # per task
    bench_context: int = 2        # context sentences of cloze items
    languages: Optional[Tuple[str, ...]] = None   # None: the two-language world of before (EN, FR)

    @property
    def langs(self) -> Tuple[str, ...]:
        return tuple(self.languages) if self.languages is not None else LANGS

    def to_dict(self) -> Dict:
        """As recorded in world.json and the bench manifest (no ``languages`` key for the default world)."""
        d = asdict(self)
        if self.languages is None:
            del d["languages"]
        else:
            d["languages"] = list(self.languages)
        return d

    def check(self) -> None:
        if self.languages is not None:
            parse_languages(",".join(self.languages))
        for name in ("codebook_size", "topics", "concepts_per_topic", "characters", "function_words",
                     "stories", "valid_stories", "min_sentences", "bench_items", "bench_context"):
            if getattr(self, name) < 1:
                raise DataError(f"world: --{name.replace('_', '-')}: expected an integer >= 1, got {getattr(self, name)}")
        if self.topics < 2 or self.characters < 2:
            raise DataError("world: --topics and --characters: expected at least 2 (cloze distractors need another)")
        if self.max_sentences < self.min_sentences or self.min_sentences <= self.bench_context:
            raise DataError(f"world: --min-sentences: expected bench_context ({self.bench_context}) < min_sentences "
                            f"<= max_sentences, got {self.min_sentences}..{self.max_sentences}")
        if not 0.0 <= self.noise < 0.5:
            raise DataError(f"world: --noise: expected a number in [0, 0.5), got {self.noise}")
        if self.codebook_size < 16:
            raise DataError(f"world: --codebook-size: expected >= 16, got {self.codebook_size}")


class World:
    """The lexicon and word order of every language and a story generator; ``World(spec).story(rng)``."""

    def __init__(self, spec: WorldSpec):
        spec.check()
        self.spec = spec
        self.languages = spec.langs
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5EED]))
        C = spec.codebook_size
        n_concepts = spec.topics * spec.concepts_per_topic + spec.characters
        # N languages: no word form in two languages (or two words); the default world drew each language's
        # words independently (a chance collision kept, byte for byte)
        shared = set() if spec.languages is not None else None

        def lexicon(n: int, lo: int, hi: int) -> List[List[int]]:
            words, seen = [], (set() if shared is None else shared)
            while len(words) < n:
                w = tuple(int(u) for u in rng.integers(0, C, size=int(rng.integers(lo, hi + 1))))
                if w not in seen:
                    seen.add(w)
                    words.append(list(w))
            return words

        # independent pronunciations per language: shared meaning, no shared form
        self.words = {lang: lexicon(n_concepts, 2, 4) for lang in self.languages}
        self.function = {lang: lexicon(spec.function_words, 1, 2) for lang in self.languages}
        # word order: the default world's EN and FR share the concepts' order; N languages one order each
        orders = word_orders(spec.seed, len(self.languages)) if spec.languages is not None else None
        self.orders: Dict[str, Optional[List[int]]] = {l: (orders[i] if orders else None)
                                                       for i, l in enumerate(self.languages)}
        self.topic_concepts = [list(range(t * spec.concepts_per_topic, (t + 1) * spec.concepts_per_topic))
                               for t in range(spec.topics)]
        self.character_concepts = list(range(spec.topics * spec.concepts_per_topic, n_concepts))
        z = 1.0 / np.arange(1, spec.concepts_per_topic + 1)
        self.zipf = z / z.sum()

    # -- content (language-independent) -----------------------------------------------------
    def sentence_concepts(self, rng: np.random.Generator, topic: int, hero: int) -> List[int]:
        n = int(rng.integers(2, SLOTS))
        words = rng.choice(self.topic_concepts[topic], size=n, p=self.zipf)
        return [hero] + [int(w) for w in words]

    def story_concepts(self, rng: np.random.Generator, topic: int, hero: int, n: int) -> List[List[int]]:
        return [self.sentence_concepts(rng, topic, hero) for _ in range(n)]

    # -- rendering ---------------------------------------------------------------------------
    def render(self, concepts: Sequence[int], lang: str, rng: np.random.Generator) -> List[int]:
        fw = self.function[lang]
        order = self.orders[lang]
        if order is not None:
            concepts = [concepts[j] for j in order if j < len(concepts)]
        out: List[int] = []
        for i, c in enumerate(concepts):
            out += fw[i % len(fw)]
            out += self.words[lang][c]
        if self.spec.noise:
            arr = np.array(out)
            flip = rng.random(len(arr)) < self.spec.noise
            arr[flip] = rng.integers(0, self.spec.codebook_size, size=int(flip.sum()))
            out = arr.tolist()
        return [int(u) for u in out]

    def render_story(self, sents: Sequence[Sequence[int]], rng: np.random.Generator) -> Dict[str, List[List[int]]]:
        return {lang: [self.render(s, lang, rng) for s in sents] for lang in self.languages}

    def lexicon_dict(self) -> Dict:
        d = {"words": self.words, "function_words": self.function, "topic_concepts": self.topic_concepts,
             "character_concepts": self.character_concepts}
        if self.spec.languages is not None:
            d["word_orders"] = self.orders
        return d


def _atomic_jsonl(files, path: str, rows) -> int:
    n = 0
    with files.open(path) as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
            n += 1
    return n


@dataclass(frozen=True)
class BenchSet:
    """One held-out set: ``benchmark`` (sTC | sSC | align) in the languages ``a``, ``b`` (cloze: context
    language, ending language)."""
    benchmark: str
    a: str
    b: str

    @property
    def stem(self) -> str:          # stc_en_de, ssc_de_de, align_en_de
        return f"{self.benchmark.lower()}_{self.a}_{self.b}"

    def file(self, per_set: bool) -> str:
        if per_set:
            return self.stem + ".jsonl"
        return ("align" if self.benchmark == "align" else "cloze") + ".jsonl"


def bench_plan(langs: Sequence[str]) -> List[BenchSet]:
    """The sets of a world in its generation order: sTC then sSC, each monolingual in every language and then
    every ordered pair; then align for every unordered pair (for EN, FR: the default world's order)."""
    directions = [(l, l) for l in langs] + list(itertools.permutations(langs, 2))
    return ([BenchSet(kind, a, b) for kind in ("sTC", "sSC") for a, b in directions]
            + [BenchSet("align", a, b) for a, b in itertools.combinations(langs, 2)])


def _cloze_items(world: World, spec: WorldSpec, rng: np.random.Generator, kind: str, a: str, b: str) -> Iterator[Dict]:
    """Topic / story cloze items with the context in ``a`` and the endings in ``b``, from fresh stories."""
    k = spec.bench_context
    for n in range(spec.bench_items):
        topic = int(rng.integers(spec.topics))
        hero = int(rng.choice(world.character_concepts))
        sents = world.story_concepts(rng, topic, hero, k + 1)
        right = sents[k]
        if kind == "sTC":   # same hero, another topic: only the topic tells them apart
            other = int((topic + 1 + rng.integers(spec.topics - 1)) % spec.topics)
            wrong = world.sentence_concepts(rng, other, hero)
        else:               # same topic, another hero: only the story's hero tells them apart
            others = [c for c in world.character_concepts if c != hero]
            wrong = [int(rng.choice(others))] + right[1:]
        ctx = [u for s in sents[:k] for u in world.render(s, a, rng)]
        cands = [world.render(right, b, rng), world.render(wrong, b, rng)]
        correct = int(rng.integers(2))
        if correct == 1:
            cands.reverse()
        yield {"id": f"{kind}-{a}-{b}-{n}", "benchmark": kind, "languages": [a, b],
               "context": ctx, "candidates": cands, "correct": correct, "meta": {"topic": topic, "hero": hero}}


def _align_items(world: World, spec: WorldSpec, rng: np.random.Generator, a: str, b: str) -> Iterator[Dict]:
    """Parallel sentences in ``a`` and ``b`` (ids ``align-<n>`` in the default world, else ``align-<a>-<b>-<n>``)."""
    tag = "align" if spec.languages is None else f"align-{a}-{b}"
    for n in range(spec.bench_items):
        topic = int(rng.integers(spec.topics))
        s = world.sentence_concepts(rng, topic, int(rng.choice(world.character_concepts)))
        yield {"id": f"{tag}-{n}", "benchmark": "align", "languages": [a, b],
               "utterances": [world.render(s, a, rng), world.render(s, b, rng)]}


def _write_bench(files, world: World, spec: WorldSpec, bench: str) -> Dict[str, int]:
    """manifest.json and the sets (one rng stream, in ``bench_plan`` order; the default world's cloze sets
    all in cloze.jsonl, its align set in align.jsonl). Returns the item counts."""
    from megaslm.vocab import UnitVocab

    per_set = spec.languages is not None
    plan = bench_plan(world.languages)
    vocab = UnitVocab(codebook_size=spec.codebook_size, languages=world.languages)
    manifest = {"format": "megaslm-evals", "version": 1, "vocab": vocab.to_dict(), "source": "data_tools.world",
                "world": spec.to_dict()}
    if per_set:
        manifest["sets"] = {e.file(True): {"benchmark": e.benchmark, "languages": [e.a, e.b],
                                           "items": spec.bench_items} for e in plan}
    with files.open(os.path.join(bench, "manifest.json")) as f:
        json.dump(manifest, f, indent=1)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 3]))
    counts = {"cloze_items": 0, "align_items": 0}
    for name, group in itertools.groupby(plan, key=lambda e: e.file(per_set)):
        rows = (r for e in group for r in (_align_items(world, spec, rng, e.a, e.b) if e.benchmark == "align"
                                           else _cloze_items(world, spec, rng, e.benchmark, e.a, e.b)))
        counts["align_items" if name.startswith("align") else "cloze_items"] += _atomic_jsonl(
            files, os.path.join(bench, name), rows)
    return counts


def write_world(out_dir: str, spec: WorldSpec) -> Dict[str, object]:
    """Write the training pool, the benchmarks and world.json (see the module doc); all or nothing."""
    spec.check()
    world = World(spec)
    with OutputFiles("the world") as files:     # a failed write (full disk) removes what this call wrote
        return _write_world(files, world, out_dir, spec)


def _write_world(files, world: "World", out_dir: str, spec: WorldSpec) -> Dict[str, object]:
    files.makedirs(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1]))

    def draw(rng, count, tag):
        for s in range(count):
            topic = int(rng.integers(spec.topics))
            hero = int(rng.choice(world.character_concepts))
            n = int(rng.integers(spec.min_sentences, spec.max_sentences + 1))
            yield {"id": f"{tag}-{s:06d}", **world.render_story(world.story_concepts(rng, topic, hero, n), rng)}

    paths = {"stories": os.path.join(out_dir, "stories.jsonl"), "valid": os.path.join(out_dir, "valid.jsonl")}
    n_stories = _atomic_jsonl(files, paths["stories"], draw(rng, spec.stories, "world"))
    n_valid = _atomic_jsonl(files, paths["valid"],
                            draw(np.random.default_rng(np.random.SeedSequence([spec.seed, 2])), spec.valid_stories, "valid"))

    bench = os.path.join(out_dir, "bench")
    files.makedirs(bench)
    counts = _write_bench(files, world, spec, bench)
    paths["bench"] = bench
    wj = os.path.join(out_dir, "world.json")
    with files.open(wj) as f:
        json.dump({"spec": spec.to_dict(), "lexicon": world.lexicon_dict(),
                   "counts": {"stories": n_stories, "valid_stories": n_valid, **counts}}, f)
    paths["world"] = wj
    return paths


def add_parser(sub) -> None:
    w = sub.add_parser("world", help="write a synthetic spoken world (EN/FR, or --languages N): parallel stories "
                                     "+ benchmarks", description=__doc__.splitlines()[0])
    w.add_argument("out_dir")
    d = WorldSpec()
    for name, val in asdict(d).items():
        if name != "languages":
            w.add_argument("--" + name.replace("_", "-"), type=type(val), default=val)
    w.add_argument("--languages", default=None, metavar="L1,L2,...",
                   help=f"2 to {MAX_LANGUAGES} languages (lowercase names), each with its own lexicon and word "
                        "order over the shared concepts; bench/ then holds stc_<ctx>_<end>.jsonl and "
                        "ssc_<ctx>_<end>.jsonl for every ordered pair (ctx = end: monolingual) and "
                        "align_<a>_<b>.jsonl for every pair. Default: the two-language EN/FR world "
                        "(bench/cloze.jsonl, bench/align.jsonl), byte-identical to earlier versions")


def run_cli(a) -> Dict[str, object]:
    fields = {k: getattr(a, k) for k in asdict(WorldSpec()) if k != "languages"}
    langs = parse_languages(a.languages) if a.languages is not None else None
    return write_world(a.out_dir, WorldSpec(languages=langs, **fields))
