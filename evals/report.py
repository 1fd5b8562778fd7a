"""Reports: results.json, results.md (the paper's table layout) and one PNG per metric across checkpoints.

Table columns: sSC-EN / sSC-FR / sTC-EN / sTC-FR | sSC EN→FR / FR→EN / sTC EN→FR / FR→EN |
sBLIMP / sWUGGY | alignment (mean cosine over layers; retrieval in the JSON). Accuracies in %.
Tasks outside the paper's columns are appended after sWUGGY.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Sequence

from megaslm.fsutil import atomic_path, atomic_write_json, atomic_write_text

from evals.benchmarks import CROSSLINGUAL, MONOLINGUAL, SYNTAX_LEXICON

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


def metric_series(results: Sequence[Dict]) -> Dict[str, List[tuple]]:
    series: Dict[str, List[tuple]] = {}
    for i, r in enumerate(results):
        x = r.get("step") if r.get("step") is not None else i
        for t, v in r.get("tasks", {}).items():
            series.setdefault(t, []).append((x, v["accuracy"] * 100))
        for t, v in r.get("alignment", {}).items():
            series.setdefault(f"{t} cosine", []).append((x, v["cosine"]))
            series.setdefault(f"{t} retrieval", []).append((x, v["retrieval"] * 100))
    return series


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("→", "2")).strip("_")


def write_plots(results: Sequence[Dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = os.path.join(out_dir, "plots")
    os.makedirs(d, exist_ok=True)
    paths = []
    for name, pts in sorted(metric_series(results).items()):
        pts = sorted(pts)
        fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("cosine" if name.endswith("cosine") else "accuracy (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(d, f"{_slug(name)}.png")
        with atomic_path(p, suffix=".png") as tmp:   # savefig takes the format from the extension
            fig.savefig(tmp)
        plt.close(fig)
        paths.append(p)
    return paths


def write_reports(results: Sequence[Dict], out_dir: str) -> Dict[str, object]:
    os.makedirs(out_dir, exist_ok=True)
    rj = os.path.join(out_dir, "results.json")
    atomic_write_json(rj, {"checkpoints": list(results)}, indent=1, ensure_ascii=False)
    rm = os.path.join(out_dir, "results.md")
    atomic_write_text(rm, markdown_table(results))
    return {"json": rj, "markdown": rm, "plots": write_plots(results, out_dir)}
