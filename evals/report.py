"""Reports: results.json, results.md (the paper's table layout), evals.png (every metric vs step) and the newest
checkpoint's N x N cross-lingual matrices (evals/xling.py: xling_<benchmark>.md/.png, align_matrix.md/.png).

Table columns: sSC-EN / sSC-FR / sTC-EN / sTC-FR | sSC EN→FR / FR→EN / sTC EN→FR / FR→EN |
sBLIMP / sWUGGY | alignment (mean cosine over layers; retrieval in the JSON). Accuracies in %.
Tasks outside the paper's columns are appended after sWUGGY.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

from megaslm import figures
from megaslm.fsutil import atomic_write_json, atomic_write_text
from megaslm.telemetry import read_step_records

from evals.benchmarks import ALIGN, CROSSLINGUAL, MONOLINGUAL, SYNTAX_LEXICON, chance_percent
from evals.xling import write_matrix_files

SCORING_TEXT = {"mean": "mean log-likelihood per token of the whole utterance, context included",
                "sum_continuation": "summed log-likelihood of the ending given the context",
                "mean_continuation": "mean log-likelihood per token of the ending only, given the context"}


def _columns(results: Sequence[Dict]) -> List[str]:
    fixed = MONOLINGUAL + CROSSLINGUAL + SYNTAX_LEXICON
    extra = sorted({t for r in results for t in r.get("tasks", {})} - set(fixed))
    return fixed + extra


def markdown_table(results: Sequence[Dict]) -> str:
    cols = _columns(results)
    mono, cross = len(MONOLINGUAL), len(CROSSLINGUAL)
    head = ["checkpoint"] + [c.replace("sSC ", "sSC ").replace("sTC ", "sTC ") for c in cols] + ["alignment (cos)"]
    groups = (["", "monolingual"] + [""] * (mono - 1) + ["cross-lingual"] + [""] * (cross - 1)
              + ["sBLIMP / sWUGGY"] + [""] * (len(cols) - mono - cross - 1) + ["alignment"])
    lines = ["| " + " | ".join(groups) + " |", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) + 1)) + "|"]
    for r in results:
        cells = [r.get("tag") or str(r.get("step"))]
        for c in cols:
            t = r.get("tasks", {}).get(c)
            cells.append(f"{t['accuracy'] * 100:.2f}" if t else "–")
        al = r.get("alignment", {})
        cells.append(" / ".join(f"{v['cosine']:.2f}" for _, v in sorted(al.items())) if al else "–")
        lines.append("| " + " | ".join(cells) + " |")
    scoring = {r.get("scoring") for r in results}
    lines.append("")
    lines.append(f"Accuracy in % (ties count one half); scoring: "
                 f"{', '.join(f'{s} ({SCORING_TEXT.get(s, s)})' for s in sorted(s for s in scoring if s))}. "
                 f"Alignment: mean over layers of the cosine of mean-pooled hidden states of parallel utterances.")
    return "\n".join(lines) + "\n"


def training_results_path(checkpoint: str) -> str:
    """Where evals/hooks.py logged the run's evaluations during training: ``<run>/evals/results.jsonl``, the
    run being the folder above ``checkpoints/`` (else the checkpoint's own folder)."""
    d = os.path.dirname(os.path.abspath(checkpoint))
    run = os.path.dirname(d) if os.path.basename(d) == "checkpoints" else d
    return os.path.join(run, "evals", "results.jsonl")


def read_training_results(path: str) -> List[Dict]:
    """The evaluations during training (evals/hooks.py's ``results.jsonl``), one record per step: a resumed
    run re-evaluates a step, the last record wins; a line cut by a kill is skipped. [] without the file."""
    return read_step_records(path)


TRAINING, CHECKPOINTS = "during training", "kept checkpoints"


def metric_series(results: Sequence[Dict], during_training: Sequence[Dict] = ()) -> Dict[str, Dict]:
    """Per metric, in the table's order: ``{"cosine": bool, "chance": % or None, "points": {source: [(step,
    value)]}}``; accuracies and retrieval@1 in %. Retrieval's chance is 1/pairs (the right partner among N)."""
    series: Dict[str, Dict] = {}

    def add(name, value, source, x, chance=None, cosine=False):
        s = series.setdefault(name, {"cosine": cosine, "chance": chance, "points": {}})
        s["points"].setdefault(source, []).append((x, value))

    for source, recs in ((TRAINING, during_training), (CHECKPOINTS, results)):
        for i, r in enumerate(recs):
            x = r.get("step") if r.get("step") is not None else i
            for t, v in r.get("tasks", {}).items():
                add(t, v["accuracy"] * 100, source, x, chance_percent(v))
            for t, v in sorted(r.get("alignment", {}).items()):
                add(f"{t} retrieval@1", v["retrieval"] * 100, source, x, 100.0 / v["pairs"] if v.get("pairs") else None)
                add(f"{t} cosine", v["cosine"], source, x, cosine=True)
    order = _columns([{"tasks": {k: 0 for k, s in series.items() if not k.startswith(ALIGN + " ")}}])
    return {k: series[k] for k in order + sorted(k for k in series if k.startswith(ALIGN + " ")) if k in series}


def eval_figure(results: Sequence[Dict], during_training: Sequence[Dict] = ()):
    """The run's one figure: each metric vs step across the kept checkpoints and the evaluations during
    training, accuracies on 0-100 % with chance drawn; a single evaluated step is a bar chart. None when
    nothing was scored."""
    series = metric_series(results, during_training)
    if not series:
        return None
    steps = {x for s in series.values() for pts in s["points"].values() for x, _ in pts}
    return (_bar_figure if len(steps) == 1 else _curve_figure)(series, steps)


def _curve_figure(series: Dict[str, Dict], steps) -> object:
    plt = figures.pyplot()
    ncol = min(4, len(series))
    nrow = -(-len(series) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow + 0.5), dpi=100, squeeze=False)
    style = {TRAINING: {"marker": "o", "markersize": 3, "color": "C0"},
             CHECKPOINTS: {"marker": "s", "markersize": 6, "color": "C1"}}
    for ax, (name, s) in zip(axes.flat, series.items()):
        for source, pts in s["points"].items():
            pts = sorted(pts)   # kept checkpoints joined by a line only when no training curve runs through
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=source, **style[source],
                    linestyle="none" if source == CHECKPOINTS and TRAINING in s["points"] else "-")
        if s["cosine"]:
            figures.cosine_axis(ax, [y for pts in s["points"].values() for _, y in pts])
        else:
            figures.accuracy_axis(ax, s["chance"], "retrieval@1 (%)" if name.endswith("retrieval@1") else
                                  "accuracy (%)")
        figures.integer_steps(ax, steps)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    figures.figure_legend(fig, axes.flat, ncol=3)
    fig.suptitle(f"evaluation vs training step ({len(steps)} steps)", fontsize=10, x=0.02, ha="left")
    return fig


def _bar_figure(series: Dict[str, Dict], steps) -> object:
    plt = figures.pyplot()
    acc = [k for k, s in series.items() if not s["cosine"]]
    cos = [k for k, s in series.items() if s["cosine"]]
    fig, axes = plt.subplots(1, 1 + bool(cos), figsize=(2.0 + 0.7 * len(acc) + 1.2 * len(cos), 4.2), dpi=100,
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, len(acc))] + [len(cos)] * bool(cos)})
    sources = [src for src in (TRAINING, CHECKPOINTS) if any(src in series[k]["points"] for k in series)]
    for ax, keys in zip(axes[0], (acc, cos)):
        vals = {src: [series[k]["points"].get(src, [(None, None)])[0][1] for k in keys] for src in sources}
        containers = figures.grouped_bars(ax, keys, vals, chance=[series[k]["chance"] for k in keys])
        for c in containers:
            ax.bar_label(c, fmt="%.2f" if ax is not axes[0][0] else "%.1f", fontsize=7)
        if ax is axes[0][0]:
            figures.accuracy_axis(ax, label="accuracy / retrieval@1 (%)")
        else:
            figures.cosine_axis(ax, [v for vs in vals.values() for v in vs if v is not None])
    figures.figure_legend(fig, axes[0])
    fig.suptitle(f"evaluation at step {next(iter(steps))} (one evaluated step)", fontsize=10, x=0.02, ha="left")
    return fig


def write_plots(results: Sequence[Dict], out_dir: str, during_training: Sequence[Dict] = ()) -> List[str]:
    """``<out_dir>/evals.png`` (see ``eval_figure``); [] when nothing was scored."""
    fig = eval_figure(results, during_training)
    return [figures.save_png(fig, os.path.join(out_dir, "evals.png"))] if fig is not None else []


def write_reports(results: Sequence[Dict], out_dir: str, during_training: Sequence[Dict] = ()) -> Dict[str, object]:
    os.makedirs(out_dir, exist_ok=True)
    rj = os.path.join(out_dir, "results.json")
    atomic_write_json(rj, {"checkpoints": list(results)}, indent=1, ensure_ascii=False)
    rm = os.path.join(out_dir, "results.md")
    atomic_write_text(rm, markdown_table(results))
    newest = {(results[-1].get("tag") or f"step {results[-1].get('step')}"): results[-1:]} if results else {}
    return {"json": rj, "markdown": rm, "plots": write_plots(results, out_dir, during_training),
            "matrices": write_matrix_files(out_dir, newest)}   # xling_<benchmark>.md/.png, align_matrix.md/.png
