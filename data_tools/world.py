"""A synthetic bilingual "spoken" world: two languages that share concepts but not pronunciations.

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

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from data_tools.common import OutputFiles
from data_tools.errors import DataError

LANGS = ("en", "fr")


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

    def check(self) -> None:
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
    """The lexicon of both languages and a story generator; ``World(spec).story(rng)``."""

    def __init__(self, spec: WorldSpec):
        spec.check()
        self.spec = spec
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5EED]))
        C = spec.codebook_size
        n_concepts = spec.topics * spec.concepts_per_topic + spec.characters

        def lexicon(n: int, lo: int, hi: int) -> List[List[int]]:
            words, seen = [], set()
            while len(words) < n:
                w = tuple(int(u) for u in rng.integers(0, C, size=int(rng.integers(lo, hi + 1))))
                if w not in seen:
                    seen.add(w)
                    words.append(list(w))
            return words

        # independent pronunciations per language: shared meaning, no shared form
        self.words = {lang: lexicon(n_concepts, 2, 4) for lang in LANGS}
        self.function = {lang: lexicon(spec.function_words, 1, 2) for lang in LANGS}
        self.topic_concepts = [list(range(t * spec.concepts_per_topic, (t + 1) * spec.concepts_per_topic))
                               for t in range(spec.topics)]
        self.character_concepts = list(range(spec.topics * spec.concepts_per_topic, n_concepts))
        z = 1.0 / np.arange(1, spec.concepts_per_topic + 1)
        self.zipf = z / z.sum()

    # -- content (language-independent) -----------------------------------------------------
    def sentence_concepts(self, rng: np.random.Generator, topic: int, hero: int) -> List[int]:
        n = int(rng.integers(2, 4))
        words = rng.choice(self.topic_concepts[topic], size=n, p=self.zipf)
        return [hero] + [int(w) for w in words]

    def story_concepts(self, rng: np.random.Generator, topic: int, hero: int, n: int) -> List[List[int]]:
        return [self.sentence_concepts(rng, topic, hero) for _ in range(n)]

    # -- rendering ---------------------------------------------------------------------------
    def render(self, concepts: Sequence[int], lang: str, rng: np.random.Generator) -> List[int]:
        fw = self.function[lang]
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
        return {lang: [self.render(s, lang, rng) for s in sents] for lang in LANGS}

    def lexicon_dict(self) -> Dict:
        return {"words": self.words, "function_words": self.function, "topic_concepts": self.topic_concepts,
                "character_concepts": self.character_concepts}


def _atomic_jsonl(files, path: str, rows) -> int:
    n = 0
    with files.open(path) as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
            n += 1
    return n


def _bench_items(world: World, spec: WorldSpec, rng: np.random.Generator) -> Tuple[List[Dict], List[Dict]]:
    """Cloze items (sTC, sSC in 4 language pairs) and align items, from fresh held-out stories."""
    k = spec.bench_context
    cloze, align = [], []
    for kind in ("sTC", "sSC"):
        for a, b in (("en", "en"), ("fr", "fr"), ("en", "fr"), ("fr", "en")):
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
                cloze.append({"id": f"{kind}-{a}-{b}-{n}", "benchmark": kind, "languages": [a, b],
                              "context": ctx, "candidates": cands, "correct": correct,
                              "meta": {"topic": topic, "hero": hero}})
    for n in range(spec.bench_items):
        topic = int(rng.integers(spec.topics))
        s = world.sentence_concepts(rng, topic, int(rng.choice(world.character_concepts)))
        align.append({"id": f"align-{n}", "benchmark": "align", "languages": ["en", "fr"],
                      "utterances": [world.render(s, "en", rng), world.render(s, "fr", rng)]})
    return cloze, align


def write_world(out_dir: str, spec: WorldSpec) -> Dict[str, object]:
    """Write the training pool, the benchmarks and world.json (see the module doc); all or nothing."""
    spec.check()
    world = World(spec)
    with OutputFiles("the world") as files:     # a failed write (full disk) removes what this call wrote
        return _write_world(files, world, out_dir, spec)


def _write_world(files, world: "World", out_dir: str, spec: WorldSpec) -> Dict[str, object]:
    from megaslm.vocab import UnitVocab

    files.makedirs(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1]))

    def draw(rng, count, tag):
        out = []
        for s in range(count):
            topic = int(rng.integers(spec.topics))
            hero = int(rng.choice(world.character_concepts))
            n = int(rng.integers(spec.min_sentences, spec.max_sentences + 1))
            out.append({"id": f"{tag}-{s:06d}", **world.render_story(world.story_concepts(rng, topic, hero, n), rng)})
        return out

    stories = draw(rng, spec.stories, "world")
    paths = {"stories": os.path.join(out_dir, "stories.jsonl"), "valid": os.path.join(out_dir, "valid.jsonl")}
    _atomic_jsonl(files, paths["stories"], stories)
    valid = draw(np.random.default_rng(np.random.SeedSequence([spec.seed, 2])), spec.valid_stories, "valid")
    _atomic_jsonl(files, paths["valid"], valid)

    bench = os.path.join(out_dir, "bench")
    files.makedirs(bench)
    brng = np.random.default_rng(np.random.SeedSequence([spec.seed, 3]))
    cloze, align = _bench_items(world, spec, brng)
    vocab = UnitVocab(codebook_size=spec.codebook_size, languages=LANGS)
    with files.open(os.path.join(bench, "manifest.json")) as f:
        json.dump({"format": "megaslm-evals", "version": 1, "vocab": vocab.to_dict(), "source": "data_tools.world",
                   "world": asdict(spec)}, f, indent=1)
    _atomic_jsonl(files, os.path.join(bench, "cloze.jsonl"), cloze)
    _atomic_jsonl(files, os.path.join(bench, "align.jsonl"), align)
    paths["bench"] = bench
    wj = os.path.join(out_dir, "world.json")
    with files.open(wj) as f:
        json.dump({"spec": asdict(spec), "lexicon": world.lexicon_dict(),
                   "counts": {"stories": len(stories), "valid_stories": len(valid), "cloze_items": len(cloze), "align_items": len(align)}}, f)
    paths["world"] = wj
    return paths


def add_parser(sub) -> None:
    w = sub.add_parser("world", help="write a synthetic bilingual spoken world: parallel stories + benchmarks",
                       description=__doc__.splitlines()[0])
    w.add_argument("out_dir")
    d = WorldSpec()
    for name, val in asdict(d).items():
        w.add_argument("--" + name.replace("_", "-"), type=type(val), default=val)


def run_cli(a) -> Dict[str, object]:
    fields = {k: getattr(a, k) for k in asdict(WorldSpec())}
    return write_world(a.out_dir, WorldSpec(**fields))
