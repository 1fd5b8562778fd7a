"""Recipe templates over a language set: ``{name: interleaving, languages: [en, fr, de], probs: [...]}`` or
``{name: interleaving, pairs: [en-fr, en-de]}`` in a spec's ``recipes`` -> the datasets they need (``python -m
data_tools build`` over the spec's ``stories`` with ``--langs/--probs`` or ``--pairs/--pair-weights``) and their
stages, as a custom recipe of the spec (``apply_templates``). The rest of the expansion (``{p}`` instances, the
budget split by stage fractions, matching) treats them as it treats ``custom_recipes``.

Kinds: ``mono`` (one monolingual stage per language, equal shares or ``probs``), ``blend`` (one stage blending the
languages' monolingual datasets, weights ``probs``), ``story`` (the story-level baseline: each story whole in one
language, ``--mode story-random``), ``interleaving`` (a language drawn per sentence, ``--mode random``; with
``pretrain: L`` the paper's split, L-only 75/85 then interleaved 10/85) and ``interleaving_ft`` (the paper's
schedule over the set: ``pretrain`` (default the first language) 75%, interleaved 10%, then 15% of fine-tuning
alternating over the set's languages, ``ft_rounds`` times). The paper's names as strings (``en_fr``,
``interleaving``, ...) stay the built-in recipes of ``spec.BUILTIN_RECIPES`` over the spec's own datasets.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megaslm.config import ConfigError
from megaslm.config_io import _build
from megaslm.sweeps.spec import (BUILTIN_RECIPES, DataRef, DatasetSpec, RecipeSpec, RecipeStage, SweepError, SweepSpec,
                                 fmt_num, line_of)

KINDS = ("mono", "blend", "story", "interleaving", "interleaving_ft")
SUM_TOLERANCE = 1e-6          # probs must sum to 1 within this (as data_tools --probs)
PAPER_SPLIT = (0.75, 0.10, 0.15)   # pretraining, interleaving, fine-tuning (configs/recipes: 75k / 10k / 15k steps)


@dataclass
class RecipeTemplate:
    name: str = ""                                       # the kind: mono | blend | story | interleaving | interleaving_ft
    label: Optional[str] = None                          # the recipe's name in run names (default from the design)
    languages: List[str] = field(default_factory=list)   # default: the spec's languages
    probs: Optional[List[float]] = None                  # per language (sum 1); mono: stage shares; blend: weights
    pairs: List[str] = field(default_factory=list)       # "en-fr": the pivot design (story, interleaving*)
    pair_weights: Optional[List[float]] = None           # relative, one per pair
    pretrain: Optional[str] = None                       # interleaving*: the language of the monolingual first stage
    ft_rounds: int = 2                                   # interleaving_ft: rounds of alternating fine-tuning


@dataclass
class _Design:
    """A checked template: its languages (the pairs' in order of first appearance) and build arguments."""
    t: RecipeTemplate
    langs: List[str]
    pairs: List[Tuple[str, str]]
    where: str

    def tag(self) -> str:
        if self.pairs:
            w = f"_w{'-'.join(fmt_num(x) for x in self.t.pair_weights)}" if self.t.pair_weights else ""
            return "+".join(f"{a}-{b}" for a, b in self.pairs) + w
        w = f"_w{'-'.join(fmt_num(x) for x in self.t.probs)}" if self.t.probs else ""
        return "-".join(self.langs) + w

    def args(self) -> List[str]:
        if self.pairs:
            out = ["--pairs", ",".join(f"{a}-{b}" for a, b in self.pairs), "--p", "{p}"]
            return out + (["--pair-weights", ",".join(fmt_num(x) for x in self.t.pair_weights)]
                          if self.t.pair_weights else [])
        return ["--langs", ",".join(self.langs)] + (["--probs", ",".join(fmt_num(x) for x in self.t.probs)]
                                                    if self.t.probs else [])


# ------------------------------------------------------------------------------------------------
# Where in the spec file (YAML nodes: the line of recipes[i] and of its fields)
# ------------------------------------------------------------------------------------------------
def _recipe_lines(src: str) -> List[Tuple[int, Dict[str, int]]]:
    """Per item of the top-level ``recipes`` list: (its line, {field: line})."""
    import yaml

    try:
        with open(src) as f:
            root = yaml.compose(f)
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for k, v in root.value:
        if k.value == "recipes" and isinstance(v, yaml.SequenceNode):
            return [(item.start_mark.line + 1,
                     {fk.value: fk.start_mark.line + 1 for fk, _ in item.value} if isinstance(item, yaml.MappingNode)
                     else {}) for item in v.value]
    return []


def _loc(src: str, lines, i: int, key: Optional[str] = None) -> str:
    """``src:LINE`` of recipes[i] (of its field ``key`` when the file has it)."""
    if i < len(lines):
        return f"{src}:{lines[i][1].get(key, lines[i][0]) if key else lines[i][0]}"
    return line_of(src, "recipes")


def _where(src: str, lines, i: int, key: Optional[str] = None) -> str:
    return f"{_loc(src, lines, i, key)}: recipes[{i}]" + (f".{key}" if key else "")


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def _check_weights(vals: Optional[List[float]], n: int, of: str, sum1: bool, where: str) -> None:
    if vals is None:
        return
    if len(vals) != n:
        raise SweepError(f"{where}: expected {n} numbers (one per {of}), got {len(vals)}")
    if any(v < 0 for v in vals) or sum(vals) <= 0:
        raise SweepError(f"{where}: expected non-negative numbers, at least one positive, got {vals}")
    if sum1 and abs(sum(vals) - 1.0) > SUM_TOLERANCE:
        raise SweepError(f"{where}: expected probabilities summing to 1, got {vals} (sum {sum(vals):g})")


def _parse_pairs(t: RecipeTemplate, known: Sequence[str], where) -> List[Tuple[str, str]]:
    pairs = []
    for item in t.pairs:
        parts = str(item).split("-")
        if len(parts) != 2 or not all(parts):
            raise SweepError(f"{where('pairs')}: expected language pairs like en-fr, got {item!r}")
        a, b = parts
        for l in (a, b):
            if l not in known:
                raise SweepError(f"{where('pairs')}: {item} names unknown language {l!r}; the sweep's languages are "
                                 f"{', '.join(known)} (languages)")
        if a == b:
            raise SweepError(f"{where('pairs')}: {item} pairs a language with itself")
        if (a, b) in pairs:
            raise SweepError(f"{where('pairs')}: {item} is given twice")
        pairs.append((a, b))
    return pairs


def _check_template(t: RecipeTemplate, known: Sequence[str], world: Optional[Sequence[str]], where) -> _Design:
    """The template's fields against each other, the sweep's languages and the world's -> its design."""
    if t.name not in KINDS:
        raise SweepError(f"{where('name')}: unknown recipe template {t.name!r}; expected one of {', '.join(KINDS)}")
    if t.pairs and (t.languages or t.probs is not None):
        raise SweepError(f"{where('pairs')}: give languages (and probs) or pairs (and pair_weights), not both")
    if t.pairs and t.name in ("mono", "blend"):
        raise SweepError(f"{where('pairs')}: {t.name} takes languages, not pairs")
    pairs = _parse_pairs(t, known, where)
    langs = list(dict.fromkeys(l for pr in pairs for l in pr)) if pairs else list(t.languages or known)
    for l in t.languages:
        if l not in known:
            raise SweepError(f"{where('languages')}: unknown language {l!r}; the sweep's languages are "
                             f"{', '.join(known)} (languages)")
    if len(set(langs)) != len(langs):
        raise SweepError(f"{where('languages')}: a language is given twice in {langs}")
    if t.name not in ("mono", "blend") and len(langs) < 2:
        raise SweepError(f"{where('languages')}: {t.name} needs at least two languages, got {langs}")
    missing = [l for l in langs if world is not None and l not in world]
    if missing:
        raise SweepError(f"{where('pairs' if pairs else 'languages')}: language {missing[0]!r} is not in the world "
                         f"the stories come from ({', '.join(world)}: its --languages)")
    _check_weights(t.probs, len(langs), "language of " + ", ".join(langs), t.name != "blend", where("probs"))
    if t.pair_weights is not None and not pairs:
        raise SweepError(f"{where('pair_weights')}: needs pairs")
    _check_weights(t.pair_weights, len(pairs), "pair", False, where("pair_weights"))
    if t.pretrain is not None and (t.name not in ("interleaving", "interleaving_ft") or t.pretrain not in langs):
        raise SweepError(f"{where('pretrain')}: expected one of the recipe's languages ({', '.join(langs)}) "
                         f"with interleaving or interleaving_ft, got {t.pretrain!r}")
    if t.ft_rounds < 1:
        raise SweepError(f"{where('ft_rounds')}: expected an integer >= 1, got {t.ft_rounds}")
    return _Design(t, langs, pairs, where(None))


# ------------------------------------------------------------------------------------------------
# Datasets and stages
# ------------------------------------------------------------------------------------------------
class _Maker:
    """Makes the templates' datasets (once per name; a dataset the spec defines under that name wins)."""

    def __init__(self, spec: SweepSpec, base_tree: Dict, languages: Sequence[str], spec_dir: str, where: str):
        self.spec, self.made = spec, {}
        if spec.stories is None:
            raise SweepError(f"{where}: a recipe template needs stories: (a dataset holding stories.jsonl, "
                             "e.g. one built by data_tools world, or a stories JSONL path) to build from")
        d = spec.datasets.get(spec.stories)
        if d is not None:
            self.input, self.needs = d.prefix.rstrip("/") + "/stories.jsonl", [spec.stories]
        else:
            self.input, self.needs = spec.stories, []
        if not self.input.startswith("{") and not os.path.isabs(self.input):   # builds run in the repository
            self.input = os.path.join(spec_dir, self.input)
        v = base_tree.get("vocab", {})
        self.vocab_args = ["--codebook-size", str(v.get("codebook_size", 2048)), "--languages", ",".join(languages)]
        self.vocab_args += [f"--{k.replace('_', '-')}" for k in ("lang_tags", "sentence_sep", "dedup") if v.get(k)]

    def dataset(self, name: str, mode_args: List[str]) -> str:
        if name not in self.spec.datasets:
            prefix = "{data}/" + name + ("_p{p}" if "{p}" in mode_args else "")
            self.spec.datasets[name] = DatasetSpec(
                prefix=prefix, needs=list(self.needs),
                build=["build", "-i", self.input, "-o", prefix, *mode_args, *self.vocab_args, *self.spec.build_args])
            self.made[name] = self.spec.datasets[name]
        return name

    def mono(self, lang: str) -> str:
        # --pair L,L: a story is read in L only (without it, in en and fr: every story would need both)
        return self.dataset(f"mono_{lang}", ["--mode", "mono", "--lang", lang, "--pair", f"{lang},{lang}"])


def _stages(d: _Design, mk: _Maker) -> List[Tuple[str, float, List[Tuple[str, Any]]]]:
    """A design -> [(stage, fraction, [(dataset, weight)])]."""
    t, langs = d.t, d.langs
    if t.name == "mono":
        shares = t.probs or [1.0] * len(langs)
        return [(f"mono_{l}", s, [(mk.mono(l), 1.0)]) for l, s in zip(langs, shares) if s > 0]
    if t.name == "blend":
        w = t.probs or [1.0] * len(langs)
        return [("blend", 1.0, [(mk.mono(l), x) for l, x in zip(langs, w) if x > 0])]
    if t.name == "story":
        return [("story", 1.0, [(mk.dataset(f"story_{d.tag()}", ["--mode", "story-random"] + d.args()), 1.0)])]
    inter = ("interleaving", [(mk.dataset(f"interleaved_{d.tag()}", ["--mode", "random"] + d.args()), 1.0)])
    pre = t.pretrain if t.name == "interleaving" else (t.pretrain or langs[0])
    if t.name == "interleaving":
        if pre is None:
            return [(inter[0], 1.0, inter[1])]
        return [(f"{pre}_only", PAPER_SPLIT[0], [(mk.mono(pre), 1.0)]), (inter[0], PAPER_SPLIT[1], inter[1])]
    ft = PAPER_SPLIT[2] / (t.ft_rounds * len(langs))
    return ([(f"{pre}_only", PAPER_SPLIT[0], [(mk.mono(pre), 1.0)]), (inter[0], PAPER_SPLIT[1], inter[1])]
            + [(f"ft_{l}_{r}", ft, [(mk.mono(l), 1.0)]) for r in range(1, t.ft_rounds + 1) for l in langs])


def _label(d: _Design) -> str:
    t = d.t
    if t.label:
        return t.label
    out = f"{t.name}_{d.tag()}"
    if t.pretrain is not None and not (t.name == "interleaving_ft" and t.pretrain == d.langs[0]):
        out += f"_pre-{t.pretrain}"
    return out + (f"_ft{t.ft_rounds}" if t.name == "interleaving_ft" and t.ft_rounds != 2 else "")


# ------------------------------------------------------------------------------------------------
# Into the spec
# ------------------------------------------------------------------------------------------------
def world_languages(spec: SweepSpec) -> Optional[List[str]]:
    """The languages of the world the stories come from, when a ``data_tools world`` build makes them (its
    ``--languages``; en, fr without it); None when unknown (stories from elsewhere)."""
    d = spec.datasets.get(spec.stories or "")
    if d is None or not isinstance(d.build, list) or not d.build or d.build[0] != "world":
        return None
    b = [str(x) for x in d.build]
    for i, w in enumerate(b):
        if w == "--languages" and i + 1 < len(b):
            return b[i + 1].split(",")
        if w.startswith("--languages="):
            return w.split("=", 1)[1].split(",")
    return ["en", "fr"]


def sweep_languages(spec: SweepSpec, src: str, base_tree: Dict) -> List[str]:
    """``languages`` (set as every run's vocab.languages), else the base config's vocab.languages."""
    if spec.languages:
        langs = [str(l) for l in spec.languages]
        if len(set(langs)) != len(langs):
            raise SweepError(f"{line_of(src, 'languages')}: languages: a language is given twice in {langs}")
        base_tree.setdefault("vocab", {})["languages"] = langs
        return langs
    return list(base_tree.get("vocab", {}).get("languages") or ("en", "fr"))


def apply_templates(spec: SweepSpec, src: str, base_tree: Dict) -> None:
    """Replace every template of ``spec.recipes`` by its label, adding its stages to ``spec.custom_recipes``
    and the datasets it needs to ``spec.datasets``; set ``languages`` in the base tree. In place."""
    known = sweep_languages(spec, src, base_tree)
    lines = _recipe_lines(src) if any(not isinstance(r, str) for r in spec.recipes) else []
    maker, labels = None, {}
    for i, entry in enumerate(spec.recipes):
        if isinstance(entry, str):
            continue
        where = lambda key, i=i: _where(src, lines, i, key)  # noqa: E731
        if not isinstance(entry, dict):
            raise SweepError(f"{where(None)}: expected a recipe name or a template {{name: interleaving, "
                             f"languages: [...]}}, got {entry!r}")
        try:
            t = _build(RecipeTemplate, entry, f"recipes[{i}]")
        except ConfigError as e:
            m = re.match(r"recipes\[\d+\]\.(\w+)", str(e))
            raise SweepError(f"{_loc(src, lines, i, m.group(1) if m else None)}: {e}") from None
        d = _check_template(t, known, world_languages(spec), where)
        maker = maker or _Maker(spec, base_tree, known, os.path.dirname(os.path.abspath(src)), where(None))
        label = _label(d)
        if label in BUILTIN_RECIPES or label in spec.custom_recipes or label in labels:
            raise SweepError(f"{where('label')}: recipe name {label!r} is taken (a built-in recipe, a custom recipe "
                             "or another template); give this one another label")
        labels[label] = i
        spec.custom_recipes[label] = RecipeSpec(stages=[RecipeStage(name=s, fraction=f, data=[
            DataRef(dataset=ds, weight=w) for ds, w in data]) for s, f, data in _stages(d, maker)])
        spec.recipes[i] = label
