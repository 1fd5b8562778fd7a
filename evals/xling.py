"""The N x N cross-lingual view of evaluation results (torch-free: the eval report and the sweep report use it).

From eval result records (one per seed; the format of ``results.json``'s checkpoints and of
``evals/results.jsonl``: ``{"tasks": {task: {accuracy, items, chance}}, "alignment": {task: {cosine, retrieval,
cosine_per_layer, retrieval_per_layer, pairs}}}``):

* ``task_matrix``: per cloze benchmark (sTC, sSC) the accuracy (%) per context language (row) x ending language
  (column), the diagonal monolingual (``sTC-DE``), the rest cross-lingual (``sTC EN→DE``): mean, sample standard
  deviation and count over the records;
* ``align_tables``: the alignment task of every language pair (``align EN-DE``): cosine and retrieval@1 (%) as
  a symmetric N x N matrix of the mean over layers (diagonal: not measured), and per layer (pair x layer).

``write_matrix_files`` writes ``xling_<benchmark>.md/.png`` and ``align_matrix.md/.png`` for groups of records
(the eval report: one group, the newest checkpoint; the sweep report: one group per arm, its seeds).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from megaslm import figures
from megaslm.fsutil import atomic_write_text

from evals.benchmarks import ALIGN, chance_percent, task_key

CLOZE = ("sTC", "sSC")
FIRST = ("EN", "FR")     # the paper's languages first, the others in alphabetical order
Cell = Optional[Tuple[float, float, int]]   # (mean, sample standard deviation, count); None: not measured
METRICS = (("cosine", "cosine", "%.3f"), ("retrieval", "retrieval@1 (%)", "%.1f"))


def mean_spread(xs: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation -- 0 for one value --, count)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def _cell(xs: Sequence[float]) -> Cell:
    return mean_spread(xs) if xs else None


def cell_text(cell: Cell, fmt: str = "%.1f") -> str:
    """``71.2 ± 1.3`` (several records), ``71.2`` (one: no spread), ``–`` (none)."""
    if cell is None:
        return "–"
    m, sd, n = cell
    return (fmt % m) + (f" ± {fmt % sd}" if n > 1 else "")


def _pair_of(key: str) -> Optional[Tuple[str, str]]:
    """``align EN-DE`` -> ("EN", "DE")."""
    langs = key[len(ALIGN) + 1:].split("-") if key.startswith(ALIGN + " ") else []
    return (langs[0], langs[1]) if len(langs) == 2 else None


def _cloze_of(key: str) -> Optional[Tuple[str, str, str]]:
    """``sTC-DE`` -> ("sTC", "DE", "DE"); ``sTC EN→DE`` -> ("sTC", "EN", "DE"); other tasks: None."""
    for b in CLOZE:
        rest = key[len(b) + 1:]
        if key.startswith(b + "-") and rest.isalnum():
            return b, rest, rest
        if key.startswith(b + " ") and rest.count("→") == 1:
            return (b,) + tuple(rest.split("→"))   # type: ignore[return-value]
    return None


def languages_of(records: Sequence[Dict]) -> List[str]:
    """Every language of the records' cloze and alignment tasks (upper case), EN and FR first."""
    langs = set()
    for r in records:
        langs.update(l for key in r.get("tasks", {}) for l in (_cloze_of(key) or ())[1:])
        langs.update(l for key in r.get("alignment", {}) for l in (_pair_of(key) or ()))
    return [l for l in FIRST if l in langs] + sorted(langs - set(FIRST))


def task_matrix(records: Sequence[Dict], benchmark: str, languages: Sequence[str]) -> Dict:
    """``{"languages", "cells": rows = context, columns = ending, "chance": %, "items"}`` of one cloze benchmark."""
    cells, chance, items = [], [], 0
    for a in languages:
        row = []
        for b in languages:
            key = task_key(benchmark, [a, b])
            found = [r["tasks"][key] for r in records if key in r.get("tasks", {})]
            row.append(_cell([100.0 * t["accuracy"] for t in found]))
            chance += [chance_percent(t) for t in found]
            items = max([items] + [t.get("items", 0) for t in found])
        cells.append(row)
    return {"languages": list(languages), "cells": cells, "items": items,
            "chance": sum(chance) / len(chance) if chance else 50.0}


def align_tables(records: Sequence[Dict], languages: Sequence[str]) -> Dict:
    """Per metric (cosine, retrieval in %): ``matrix`` (N x N, mean over layers, symmetric) and ``layers``
    ({pair: [cell per layer]}); ``pairs`` in the languages' order; ``chance``: retrieval's (100 / pairs)."""
    out: Dict = {"languages": list(languages), "pairs": [], "chance": None}
    scale = {"cosine": 1.0, "retrieval": 100.0}
    pool = {}
    for r in records:
        for key, v in r.get("alignment", {}).items():
            pair = _pair_of(key)
            if pair and set(pair) <= set(languages):
                pool.setdefault(tuple(sorted(pair, key=list(languages).index)), []).append(v)
    out["pairs"] = sorted(pool, key=lambda p: (list(languages).index(p[0]), list(languages).index(p[1])))
    sizes = [v["pairs"] for vs in pool.values() for v in vs if v.get("pairs")]
    out["chance"] = 100.0 * sum(1.0 / n for n in sizes) / len(sizes) if sizes else None
    for m, s in scale.items():
        mean = {p: _cell([s * v[m] for v in vs]) for p, vs in pool.items()}
        out[m] = {"matrix": [[(mean.get((a, b)) or mean.get((b, a))) if a != b else None for b in languages]
                             for a in languages],
                  "layers": {p: [_cell(vals) for vals in zip(*[[s * x for x in v[f"{m}_per_layer"]] for v in vs
                                                               if v.get(f"{m}_per_layer")])] for p, vs in pool.items()}}
    return out


def _square_table(languages: Sequence[str], cells, fmt: str, corner: str) -> List[str]:
    lines = [f"| {corner} | " + " | ".join(languages) + " |", "|---|" + "---:|" * len(languages)]
    return lines + [f"| {a} | " + " | ".join(cell_text(c, fmt) for c in row) + " |"
                    for a, row in zip(languages, cells)]


def _count(records_per_group: Dict[str, int]) -> str:
    ns = sorted(set(records_per_group.values()))
    return "one run, one seed (no spread)" if ns == [1] else (
        f"mean ± sample standard deviation over {'/'.join(map(str, ns))} seeds")


def task_markdown(benchmark: str, mats: Dict[str, Dict], counts: Dict[str, int]) -> str:
    lines = [f"# {benchmark}: accuracy (%) by context language (rows) x ending language (columns)", ""]
    for name, m in mats.items():
        lines += [f"## {name}", ""] + _square_table(m["languages"], m["cells"], "%.1f", "context \\ ending") + [""]
    chance = next(iter(mats.values()))["chance"] if mats else 50.0
    lines.append(f"Diagonal: monolingual ({benchmark}-XX); off the diagonal: cross-lingual ({benchmark} context→ending). "
                 f"Accuracy in % (ties count one half), {_count(counts)}; chance {chance:.3g} %.")
    return "\n".join(lines) + "\n"


def align_markdown(tabs: Dict[str, Dict], counts: Dict[str, int]) -> str:
    lines = ["# Alignment of parallel utterances per language pair", ""]
    for name, t in tabs.items():
        lines += [f"## {name}", ""]
        for m, label, fmt in METRICS:
            lines += [f"{label}, mean over layers:", ""] + _square_table(t["languages"], t[m]["matrix"], fmt, "") + [""]
        n_layers = max((len(c) for m, _, _ in METRICS for c in t[m]["layers"].values()), default=0)
        if n_layers:
            lines += ["per layer (layer l = the output of decoder layer l):", "",
                      "| pair | metric | " + " | ".join(f"layer {l + 1}" for l in range(n_layers)) + " |",
                      "|---|---|" + "---:|" * n_layers]
            lines += [f"| {a}-{b} | {label} | " + " | ".join(cell_text(c, fmt) for c in t[m]["layers"][(a, b)]) + " |"
                      for a, b in t["pairs"] for m, label, fmt in METRICS]
            lines.append("")
    chance = next(iter(tabs.values()))["chance"] if tabs else None
    lines.append(f"Mean-pooled hidden states of parallel utterances: cosine of matched pairs (no chance level), "
                 f"retrieval@1 of the partner among the set, both directions averaged (chance "
                 f"{'n/a' if chance is None else f'{chance:.3g} %'}); {_count(counts)}. Diagonal: not measured.")
    return "\n".join(lines) + "\n"


def _box_diagonal(ax, n: int) -> None:
    from matplotlib.patches import Rectangle

    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))


def _texts(cells, fmt: str) -> List[List[str]]:
    return [[cell_text(c, fmt) for c in row] for row in cells]


def _values(cells) -> List[List[Optional[float]]]:
    return [[None if c is None else c[0] for c in row] for row in cells]


def task_figure(benchmark: str, mats: Dict[str, Dict], counts: Dict[str, int]):
    """One heatmap per group (rows: context language, columns: ending language, the monolingual diagonal boxed),
    0-100 %, diverging at chance (white), each cell ``mean ± spread``."""
    plt = figures.pyplot()
    n = max(len(m["languages"]) for m in mats.values())
    fig, axes = plt.subplots(1, len(mats), figsize=(max(5.6, len(mats) * (1.1 * n + 2.0)), 0.55 * n + 1.9), dpi=100,
                             squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        figures.heatmap(ax, _values(m["cells"]), m["languages"], m["languages"], _texts(m["cells"], "%.1f"), 0, 100,
                        centre=m["chance"], cbar_label="accuracy (%)")
        _box_diagonal(ax, len(m["languages"]))
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("context language", fontsize=8)
        ax.set_xlabel("ending language", fontsize=8)
    fig.suptitle(f"{benchmark} accuracy (%), context × ending language\n(boxed: monolingual); {_count(counts)}",
                 fontsize=9, x=0.01, ha="left")
    return fig


def _align_panel(ax, name: str, t: Dict, m: str, label: str, fmt: str, per_layer: bool) -> None:
    chance = t["chance"] if m == "retrieval" else None
    lo, hi = (0.0, 100.0) if m == "retrieval" else (min([0.0] + [c[0] for row in t[m]["matrix"] for c in row if c]), 1.0)
    lo = -1.0 if lo < 0 else 0.0
    cbar = label + ("" if chance else " (no chance level)")
    if per_layer:
        rows = [t[m]["layers"][p] for p in t["pairs"]]
        n_layers = max(len(r) for r in rows)
        rows = [r + [None] * (n_layers - len(r)) for r in rows]
        figures.heatmap(ax, _values(rows), [f"{a}-{b}" for a, b in t["pairs"]], [str(l + 1) for l in range(n_layers)],
                        _texts(rows, fmt), lo, hi, centre=chance, cbar_label=cbar, fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("language pair", fontsize=8)
        ax.set_title(f"{name}: {label} per layer", fontsize=9)
    else:
        figures.heatmap(ax, _values(t[m]["matrix"]), t["languages"], t["languages"], _texts(t[m]["matrix"], fmt),
                        lo, hi, centre=chance, cbar_label=cbar)
        ax.set_title(f"{name}: {label}, mean over layers", fontsize=9)


def align_figure(tabs: Dict[str, Dict], counts: Dict[str, int]):
    """One row per group: cosine and retrieval@1 as N x N matrices (mean over layers), then per layer (pair x
    layer). Retrieval diverges at its chance (1 / pairs); cosine, which has none, is on one sequential scale."""
    plt = figures.pyplot()
    n = max(len(t["languages"]) for t in tabs.values())
    n_layers = max([len(c) for t in tabs.values() for m, _, _ in METRICS for c in t[m]["layers"].values()] + [0])
    cols = [(m, label, fmt, False) for m, label, fmt in METRICS]
    cols += [(m, label, fmt, True) for m, label, fmt in METRICS] if n_layers else []
    widths = [1.1 * n + 2.0] * 2 + [0.7 * n_layers + 2.2] * (len(cols) - 2)
    fig, axes = plt.subplots(len(tabs), len(cols), figsize=(sum(widths), len(tabs) * (0.55 * n + 1.7) + 0.4),
                             dpi=100, squeeze=False, gridspec_kw={"width_ratios": widths})
    for row, (name, t) in zip(axes, tabs.items()):
        for ax, (m, label, fmt, per_layer) in zip(row, cols):
            _align_panel(ax, name, t, m, label, fmt, per_layer)
    fig.suptitle(f"alignment of parallel utterances per language pair (diagonal: not measured); {_count(counts)}",
                 fontsize=9, x=0.01, ha="left")
    return fig


def benchmarks_of(records: Sequence[Dict]) -> List[str]:
    """The cloze benchmarks the records scored, in CLOZE order."""
    found = {c[0] for r in records for c in map(_cloze_of, r.get("tasks", {})) if c}
    return [b for b in CLOZE if b in found]


def write_matrix_files(out_dir: str, groups: Dict[str, Sequence[Dict]], fsync: bool = True) -> List[str]:
    """``xling_<benchmark>.md/.png`` per scored cloze benchmark and ``align_matrix.md/.png`` (where alignment was
    measured) in ``out_dir``; ``groups``: {name: records (e.g. one per seed)}. Returns the paths written."""
    groups = {k: list(v) for k, v in groups.items() if v}
    records = [r for rs in groups.values() for r in rs]
    langs = languages_of(records)
    counts = {k: len(v) for k, v in groups.items()}
    paths: List[str] = []

    def write(stem: str, text: str, fig) -> None:
        base = os.path.join(out_dir, stem)
        atomic_write_text(base + ".md", text, fsync=fsync)
        paths.extend([base + ".md", figures.save_png(fig, base + ".png", fsync=fsync)])

    os.makedirs(out_dir, exist_ok=True)
    for b in benchmarks_of(records):
        mats = {k: task_matrix(rs, b, langs) for k, rs in groups.items()}
        write(f"xling_{b}", task_markdown(b, mats, counts), task_figure(b, mats, counts))
    tabs = {k: align_tables(rs, langs) for k, rs in groups.items()}
    tabs = {k: t for k, t in tabs.items() if t["pairs"]}
    if tabs:
        write("align_matrix", align_markdown(tabs, counts), align_figure(tabs, {k: counts[k] for k in tabs}))
    return paths
