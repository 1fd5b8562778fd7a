"""The report of a sweep: results.csv, results.md (the paper's table, one row per arm), PNG plots and the N x N
cross-lingual matrices per arm (xling_<benchmark>.md/.png, align_matrix.md/.png; evals/xling.py).

Reads only what the processes wrote: ``<sweep>/sweep.json`` (the expansion), each run's
``metrics.jsonl`` (training loss per step, tokens seen), its newest checkpoint ``meta.json`` (the token
budget actually trained) and ``evals/results.json`` (launchers/eval.py). Torch-free.

Loss: where the runs log a held-out loss (the spec's ``valid``: ``eval.valid``, the same held-out data for
every arm), the curves are that validation loss vs tokens and "final loss" is its value at the last step.
Without it, the curves are the TRAINING loss per step (a moving mean over 10% of the steps) and "final loss"
is the mean training loss over the last 10% of the steps; the table and plots say which.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from evals.benchmarks import CROSSLINGUAL, MONOLINGUAL, SYNTAX_LEXICON, chance_percent  # torch-free
from evals.xling import cell_text, mean_spread, write_matrix_files  # torch-free
from megaslm import figures
from megaslm.checkpoint.layout import newest_meta
from megaslm.telemetry import read_step_records
from megaslm.sweeps.state import atomic_write

PAPER_COLUMNS = MONOLINGUAL + CROSSLINGUAL + SYNTAX_LEXICON


def _metrics(run_dir: str) -> List[Dict]:
    # a resumed run re-logs steps after its checkpoint: the last record of each step is kept
    return read_step_records(os.path.join(run_dir, "metrics.jsonl"), lambda r: "loss" in r and "tokens_seen" in r)


def collect(sweep_dir: str) -> Tuple[Dict, List[Dict]]:
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        sj = json.load(f)
    rows = []
    for r in sj["runs"]:
        row = dict(r)
        meta = newest_meta(r["dir"])
        row["tokens_trained"] = meta.get("tokens_seen") if meta else None
        row["finished"] = bool(meta) and meta.get("tokens_seen") == r["tokens"]
        hist = _metrics(r["dir"])
        valid = [(h["tokens_seen"], h["valid_loss"]) for h in hist if h.get("valid_loss") is not None]
        if valid:
            row["loss_kind"] = "validation"
            row["curve"] = valid
            row["final_loss"] = valid[-1][1]
        else:
            row["loss_kind"] = "training"
            row["curve"] = [(h["tokens_seen"], h["loss"]) for h in hist]
            tail = [h["loss"] for h in hist[-max(1, len(hist) // 10):]] if hist else []
            row["final_loss"] = sum(tail) / len(tail) if tail else None
        res_path = os.path.join(r["dir"], "evals", "results.json")
        row["tasks"], row["alignment"], row["scoring"], row["chance"] = {}, {}, None, {}
        if os.path.exists(res_path):
            with open(res_path) as f:
                res = json.load(f)["checkpoints"][-1]
            row["tasks"] = {k: v["accuracy"] * 100 for k, v in res.get("tasks", {}).items()}
            row["chance"] = {k: chance_percent(v) for k, v in res.get("tasks", {}).items()}
            row["alignment"] = {k: v["cosine"] for k, v in res.get("alignment", {}).items()}
            row["scoring"] = res.get("scoring")
            row["evals"] = res    # the whole record: the cross-lingual matrices (evals/xling.py) read per-layer alignment
        rows.append(row)
    return sj, rows


def arms(rows: Sequence[Dict]) -> List[Dict]:
    """Runs grouped over seeds: per metric the mean and the sample standard deviation (spread)."""
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in groups.items():
        a = {"arm": arm, "size": rs[0]["size"], "recipe": rs[0]["recipe"], "budget": rs[0]["budget"], "p": rs[0]["p"],
             "params": rs[0]["params"], "tokens": rs[0]["tokens"], "flops": rs[0]["flops"],
             "seeds": [r["seed"] for r in rs], "runs": rs, "metrics": {},
             "chance": {k: v for r in rs for k, v in r.get("chance", {}).items()}}
        keys = {k for r in rs for k in r["tasks"]} | {f"align {k}" for r in rs for k in r["alignment"]} | {"final_loss"}
        for k in keys:
            vals = []
            for r in rs:
                v = r["final_loss"] if k == "final_loss" else (
                    r["alignment"].get(k[6:]) if k.startswith("align ") else r["tasks"].get(k))
                if v is not None:
                    vals.append(v)
            if vals:
                a["metrics"][k] = mean_spread(vals)   # (mean, sample sd, n): the matrices' cells too
        out.append(a)
    return out


def write_csv(rows: Sequence[Dict], path: str) -> None:
    tasks = sorted({k for r in rows for k in r["tasks"]})
    aligns = sorted({k for r in rows for k in r["alignment"]})
    cols = ["run", "arm", "size", "recipe", "budget", "p", "seed", "params", "tokens", "tokens_trained", "flops",
            "final_loss", "loss_kind", "scoring"] + tasks + [f"{a} cosine" for a in aligns]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([r["name"], r["arm"], r["size"], r["recipe"], r["budget"], r["p"], r["seed"], r["params"],
                    r["tokens"], r["tokens_trained"], f"{r['flops']:.6e}",
                    "" if r["final_loss"] is None else f"{r['final_loss']:.5f}", r.get("loss_kind", "training"),
                    r["scoring"] or ""]
                   + [("" if t not in r["tasks"] else f"{r['tasks'][t]:.2f}") for t in tasks]
                   + [("" if a not in r["alignment"] else f"{r['alignment'][a]:.4f}") for a in aligns])
    atomic_write(path, buf.getvalue())


def loss_kind(rows: Sequence[Dict]) -> str:
    """validation (every run logged a held-out loss), training (none did) or mixed."""
    kinds = {r.get("loss_kind", "training") for r in rows if r.get("curve")}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "training")


LOSS_NOTE = {"validation": "held-out validation loss at the last step (the spec's valid datasets)",
             "training": "mean training loss over the last 10% of steps",
             "mixed": "held-out validation loss where a run logged one, else mean training loss over the last 10% "
                      "of steps"}


def markdown(sj: Dict, rows: Sequence[Dict], arm_rows: Sequence[Dict]) -> str:
    present = {k for r in rows for k in r["tasks"]}
    cols = [c for c in PAPER_COLUMNS if c in present] + sorted(present - set(PAPER_COLUMNS))
    aligns = sorted({k for r in rows for k in r["alignment"]})
    head = ["arm", "params", "tokens", "seeds", "final loss"] + cols + [f"{a} (cos)" for a in aligns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for a in arm_rows:
        cells = [a["arm"], f"{a['params']:,}", f"{a['tokens']:,}", str(len(a["seeds"])),
                 cell_text(a["metrics"].get("final_loss"), "%.3f")]
        cells += [cell_text(a["metrics"].get(c), "%.1f") for c in cols]
        cells += [cell_text(a["metrics"].get(f"align {x}"), "%.3f") for x in aligns]
        lines.append("| " + " | ".join(cells) + " |")
    budgets = sorted({(r["budget"]) for r in rows})
    scorings = sorted({r["scoring"] for r in rows if r["scoring"]})
    unit = "tokens" if sj.get("matching", "tokens") == "tokens" else "FLOPs"
    lines += ["", f"Matched budget ({sj.get('matching', 'tokens')}): every arm of a budget trains on exactly "
              f"{', '.join(f'{b:g}' for b in budgets)} {unit}"
              + (" (tokens differ by size at one FLOPs budget)" if unit == "FLOPs" else "")
              + f". Accuracy in % (ties count one half), mean ± sample standard deviation over seeds; scoring: "
              f"{', '.join(scorings) or 'n/a'}. Alignment: mean over layers of the cosine of mean-pooled hidden "
              f"states of parallel EN/FR utterances. Final loss: {LOSS_NOTE[loss_kind(rows)]}."]
    unfinished = [r["name"] for r in rows if not r["finished"]]
    if unfinished:
        lines.append(f"Not finished (their values are as measured so far): {', '.join(unfinished)}.")
    return "\n".join(lines) + "\n"


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> Optional[Tuple[float, float]]:
    """Least squares in log-log: ``y = a * x^(-b)`` -> (a, b); None with fewer than 2 distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    slope = sxy / sxx
    return math.exp(my - slope * mx), -slope


def _smooth(ys: Sequence[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def write_plots(rows: Sequence[Dict], arm_rows: Sequence[Dict], plot_dir: str) -> Tuple[List[str], List[str]]:
    """loss_vs_tokens.png, loss_vs_flops.png (with the power-law fits, returned as lines) and
    accuracy_vs_flops.png (where a benchmark was scored)."""
    plt = figures.pyplot()
    paths: List[str] = []

    def save(fig, name):   # fsync off: a plot is rebuilt from the table
        paths.append(figures.save_png(fig, os.path.join(plot_dir, name), fsync=False))

    kind = loss_kind([r for a in arm_rows for r in a["runs"]])
    save(_plot_loss_vs_tokens(plt, arm_rows, kind), "loss_vs_tokens.png")
    fig, fits = _plot_loss_vs_flops(plt, arm_rows, kind)
    save(fig, "loss_vs_flops.png")
    fig = accuracy_figure(arm_rows)
    if fig is not None:
        save(fig, "accuracy_vs_flops.png")
    return paths, fits


def _plot_loss_vs_tokens(plt, arm_rows: Sequence[Dict], kind: str):
    """One line per arm (seeds averaged step by step)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for a in arm_rows:
        curves = [r["curve"] for r in a["runs"] if r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
        held_out = all(r.get("loss_kind") == "validation" for r in a["runs"] if r["curve"])
        # a held-out loss is measured on a fixed sample: plotted as measured, with markers; training loss smoothed
        ax.plot(xs, ys if held_out else _smooth(ys, max(1, n // 10)), "o-" if held_out else "-",
                markersize=3, label=a["arm"])
    ax.set_xlabel("tokens")
    ax.set_ylabel({"validation": "validation loss (held out)", "training": "training loss (moving mean)"}.get(
        kind, "loss (validation where logged)"))
    ax.set_title("loss vs tokens per arm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _plot_loss_vs_flops(plt, arm_rows: Sequence[Dict], kind: str):
    """Final loss vs FLOPs per recipe, with a fitted power law -> (figure, one line per recipe)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    fits = []
    for rec in sorted({a["recipe"] for a in arm_rows}):
        pts = sorted((a["flops"], a["metrics"]["final_loss"][0]) for a in arm_rows
                     if a["recipe"] == rec and "final_loss" in a["metrics"])
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=rec)[0]
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        if fit:
            a_, b_ = fit
            lo, hi = pts[0][0], pts[-1][0]
            xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
            ax.plot(xs, [a_ * x ** -b_ for x in xs], "--", color=line.get_color())
            fits.append(f"{rec}: loss = {a_:.4g} * FLOPs^({-b_:+.4f})")
        else:
            fits.append(f"{rec}: no power-law fit (fewer than 2 distinct FLOPs)")
    if len({a["flops"] for a in arm_rows}) < 2:   # one compute point: no curve, no fit; the arms side by side
        plt.close(fig)
        return _loss_bars(plt, arm_rows, kind), fits
    from matplotlib.ticker import FormatStrFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.3g"))   # 0.94, not 9.4x10^-1
    ax.set_xlabel("training FLOPs (6N + 12LHS per token)")
    ax.set_ylabel("final validation loss" if kind == "validation" else "final loss")
    ax.set_title("final loss vs compute per recipe")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig, fits


def _loss_bars(plt, arm_rows: Sequence[Dict], kind: str):
    """Final loss per arm at the sweep's one compute point, from 0, error bar = std over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    done = [a for a in arm_rows if "final_loss" in a["metrics"]]
    figures.grouped_bars(ax, ["final validation loss" if kind == "validation" else "final loss"],
                         {a["arm"]: [a["metrics"]["final_loss"][0]] for a in done},
                         {a["arm"]: [a["metrics"]["final_loss"][1]] for a in done})
    ax.set_ylim(0, 1.35 * max((sum(a["metrics"]["final_loss"][:2]) for a in done), default=1.0))   # legend room
    ax.tick_params(axis="x", labelrotation=0)
    ax.get_xticklabels()[0].set_horizontalalignment("center")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"final loss per arm at one compute point ({arm_rows[0]['flops']:.3g} FLOPs): no power-law fit",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _scored(arm_rows: Sequence[Dict]) -> List[str]:
    """The scored metrics in the paper's order, then the others (alignment cosines ``align <task>`` last)."""
    keys = {k for a in arm_rows for k in a["metrics"]} - {"final_loss"}
    return [t for t in PAPER_COLUMNS if t in keys] + sorted(keys - set(PAPER_COLUMNS), key=lambda k: (
        k.startswith("align "), k))


def accuracy_figure(arm_rows: Sequence[Dict]):
    """Benchmarks per arm, error bars = spread over seeds, accuracies on one 0-100 % axis with chance marked,
    alignment cosine on its own axis: grouped bars at one budget (a curve needs several), else each metric vs
    compute per recipe. None without any score."""
    keys = _scored(arm_rows)
    if not keys:
        return None
    chance = {k: v for a in arm_rows for k, v in a.get("chance", {}).items()}
    if len({a["budget"] for a in arm_rows}) == 1:
        return _accuracy_bars(arm_rows, keys, chance)
    return _accuracy_curves(arm_rows, keys, chance)


def _accuracy_bars(arm_rows: Sequence[Dict], keys: List[str], chance: Dict[str, float]):
    acc = [k for k in keys if not k.startswith("align ")]
    cos = [k for k in keys if k.startswith("align ")]
    plt = figures.pyplot()
    parts = [ks for ks in (acc, cos) if ks]
    fig, axes = plt.subplots(1, len(parts), figsize=(2.0 + 0.45 * len(arm_rows) * len(keys), 4.4), dpi=100,
                             squeeze=False, gridspec_kw={"width_ratios": [len(ks) for ks in parts]})
    for ax, ks in zip(axes[0], parts):
        mean = {a["arm"]: [a["metrics"][k][0] if k in a["metrics"] else None for k in ks] for a in arm_rows}
        sd = {a["arm"]: [a["metrics"][k][1] if k in a["metrics"] else 0.0 for k in ks] for a in arm_rows}
        figures.grouped_bars(ax, [figures.metric_title(k) for k in ks], mean, sd,
                             None if ks is cos else [chance.get(k, 50.0) for k in ks])
        if ks is cos:
            figures.cosine_axis(ax, [m for ms in mean.values() for m in ms if m is not None])
        else:
            figures.accuracy_axis(ax)
    figures.figure_legend(fig, axes[0])
    seeds = sorted({len(a["seeds"]) for a in arm_rows})
    fig.suptitle(f"per arm at one budget ({arm_rows[0]['budget']:,g}): mean, error bar = std over "
                 f"{'/'.join(map(str, seeds))} seeds", fontsize=9, x=0.01, ha="left")
    return fig


def _accuracy_curves(arm_rows: Sequence[Dict], keys: List[str], chance: Dict[str, float]):
    plt = figures.pyplot()
    recipes = sorted({a["recipe"] for a in arm_rows})
    ncol = min(4, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow + 0.4), dpi=100, squeeze=False)
    for ax, t in zip(axes.flat, keys):
        for rec in recipes:
            pts = sorted((a["flops"],) + a["metrics"][t][:2] for a in arm_rows if a["recipe"] == rec and t in a["metrics"])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=rec)
        ax.set_xscale("log")
        ax.set_title(figures.metric_title(t), fontsize=9)
        ax.set_xlabel("training FLOPs", fontsize=8)
        if t.startswith("align "):
            figures.cosine_axis(ax, [a["metrics"][t][0] for a in arm_rows if t in a["metrics"]])
        else:
            figures.accuracy_axis(ax, chance.get(t, 50.0))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    figures.figure_legend(fig, axes.flat)
    fig.suptitle("each benchmark vs compute per recipe (error bar = std over seeds)", fontsize=9, x=0.01, ha="left")
    return fig


def write_report(sweep_dir: str) -> Dict[str, object]:
    sj, rows = collect(sweep_dir)
    arm_rows = arms(rows)
    out = os.path.join(sweep_dir, "report")
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "results.csv"))
    plots, fits = write_plots(rows, arm_rows, os.path.join(out, "plots"))
    md = markdown(sj, rows, arm_rows)
    md += "\nPower-law fits of final loss vs FLOPs per recipe: " + "; ".join(fits) + ".\n"
    atomic_write(os.path.join(out, "results.md"), md)
    matrices = write_matrix_files(out, {a["arm"]: [r["evals"] for r in a["runs"] if r.get("evals")] for a in arm_rows},
                                  fsync=False)   # xling_<benchmark>.md/.png, align_matrix.md/.png: seeds averaged
    return {"csv": os.path.join(out, "results.csv"), "markdown": os.path.join(out, "results.md"), "plots": plots,
            "fits": fits, "table": md, "arms": arm_rows, "rows": rows, "matrices": matrices}
