"""What the eval and sweep figures share (matplotlib, Agg): accuracy axes 0-100 %, chance marked, integer
steps, grouped bars with error bars, the atomic PNG write. Torch-free; matplotlib is imported on first use."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from megaslm.fsutil import atomic_path

CHANCE_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str, fsync: bool = True) -> str:
    """Written whole or not at all (savefig takes the format from the extension); closes the figure."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    with atomic_path(path, suffix=".png", fsync=fsync) as tmp:
        fig.savefig(tmp)
    pyplot().close(fig)
    return path


def metric_title(key: str) -> str:
    """A sweep's metric key as a title: ``align align EN-FR`` (prefix + task key) -> ``align EN-FR cosine``."""
    return f"{key[len('align '):]} cosine" if key.startswith("align align") else key


def accuracy_axis(ax, chance: Optional[float] = None, label: str = "accuracy (%)") -> None:
    """One honest scale for every accuracy: 0-100 %, the chance level (in %) drawn across."""
    ax.set_ylim(0, 100)
    ax.set_ylabel(label, fontsize=8)
    if chance is not None:
        ax.axhline(chance, **CHANCE_STYLE, label=f"chance {chance:.3g}%")
    ax.grid(alpha=0.3, axis="y")


def cosine_axis(ax, values: Sequence[float]) -> None:
    """Cosine has no chance level (mean-pooled states of unrelated utterances are not at 0): its own 0-1 axis
    (-1-1 when a value is negative), labelled so it is not read as a percentage."""
    ax.set_ylim(-1 if min(values, default=0) < 0 else 0, 1)
    ax.set_ylabel("cosine (no chance level)", fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def integer_steps(ax, steps: Sequence[int] = ()) -> None:
    """Whole steps on the x axis: the evaluated steps themselves when there are few, else round integers."""
    from matplotlib.ticker import MaxNLocator

    if 0 < len(steps) <= 7:
        ax.set_xticks(sorted(steps))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def figure_legend(fig, axes, ncol: int = 4) -> None:
    """One legend for the whole figure (top right): every distinct label of ``axes`` once."""
    handles = {l: h for ax in axes for h, l in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="upper right", fontsize=7,
               ncol=max(1, min(ncol, len(handles))))


def grouped_bars(ax, labels: Sequence[str], groups: Dict[str, Sequence[Optional[float]]],
                 spread: Optional[Dict[str, Sequence[float]]] = None,
                 chance: Optional[Sequence[Optional[float]]] = None) -> List:
    """One cluster per label, one bar per group (legend), error bars = ``spread`` (e.g. the standard deviation
    over seeds), a chance tick across each cluster; missing values (None) leave a gap. Returns the containers."""
    n = max(1, len(groups))
    width = 0.8 / n
    out = []
    for g, (name, vals) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(labels))]
        keep = [k for k, v in enumerate(vals) if v is not None]
        err = [spread[name][k] for k in keep] if spread and name in spread else None
        out.append(ax.bar([xs[k] for k in keep], [vals[k] for k in keep], width * 0.9, yerr=err, capsize=3,
                          label=name))
    seen = set()
    for i, c in enumerate(chance or []):
        if c is not None:   # one legend entry per chance value (50 % for pairs, 1/N for retrieval)
            ax.hlines(c, i - 0.45, i + 0.45, color=CHANCE_STYLE["color"], linestyle=CHANCE_STYLE["linestyle"],
                      linewidth=1.5, label=None if round(c, 6) in seen else f"chance {c:.3g}%")
            seen.add(round(c, 6))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    return out


def heatmap(ax, values: Sequence[Sequence[Optional[float]]], rows: Sequence[str], cols: Sequence[str],
            text: Sequence[Sequence[str]], vmin: float, vmax: float, centre: Optional[float] = None,
            centre_label: str = "chance", cbar_label: str = "", fontsize: float = 8):
    """A matrix as coloured cells, each annotated with ``text``; None cells are grey and say ``–``. With
    ``centre`` (e.g. the chance level) the colormap diverges from it (red below, white at it, blue above) and the
    colorbar carries a tick ``<centre> <centre_label>``; without, one sequential colormap (e.g. cosine, which
    has no chance level). Returns the colorbar."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    data = [[float("nan") if v is None else v for v in r] for r in values]   # NaN: masked, drawn in the bad colour
    cmap = pyplot().get_cmap("RdBu" if centre is not None else "viridis").with_extremes(bad="0.85")
    norm = TwoSlopeNorm(centre, vmin, vmax) if centre is not None and vmin < centre < vmax else Normalize(vmin, vmax)
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto")
    for i, r in enumerate(values):
        for j, v in enumerate(r):
            dark = v is not None and (abs(norm(v) - 0.5) > 0.3 if centre is not None else norm(v) < 0.5)
            ax.text(j, i, text[i][j] if v is not None else "–", ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=fontsize)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=fontsize)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label(cbar_label, fontsize=fontsize)
    if centre is not None:
        ticks = sorted({centre} | {t for t in (vmin + k * (vmax - vmin) / 4 for k in range(5))
                                   if abs(norm(t) - norm(centre)) > 0.08})   # apart on the bar, not in value
        cbar.set_ticks(ticks)
        cbar.set_ticklabels([f"{t:.3g} {centre_label}" if t == centre else f"{t:.3g}" for t in ticks])
        cbar.ax.axhline(centre, **{**CHANCE_STYLE, "color": "black"})
    cbar.ax.tick_params(labelsize=fontsize - 1)
    return cbar
