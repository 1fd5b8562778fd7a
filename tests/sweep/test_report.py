"""The report's arithmetic: the power-law fit of final loss vs FLOPs, and which loss a report shows."""
import math
import os

from megaslm.sweeps.report import LOSS_NOTE, fit_power_law, loss_kind


def test_power_law_fit_recovers_its_parameters():
    a, b = 37.0, 0.071
    xs = [1e15, 3e15, 1e16, 4e16, 2e17]
    fit = fit_power_law(xs, [a * x ** -b for x in xs])
    assert fit is not None
    assert math.isclose(fit[0], a, rel_tol=1e-9) and math.isclose(fit[1], b, rel_tol=1e-9)
    # noisy points: still close
    noisy = [a * x ** -b * (1 + 0.01 * (-1) ** i) for i, x in enumerate(xs)]
    na, nb = fit_power_law(xs, noisy)
    assert abs(nb - b) < 0.01


def test_power_law_needs_two_distinct_compute_points():
    assert fit_power_law([1e15, 1e15], [3.0, 2.9]) is None
    assert fit_power_law([1e15], [3.0]) is None


def test_loss_kind_says_which_loss_is_shown():
    v = {"curve": [(1, 2.0)], "loss_kind": "validation"}
    t = {"curve": [(1, 2.0)], "loss_kind": "training"}
    assert loss_kind([v, v]) == "validation" and loss_kind([t]) == "training" and loss_kind([v, t]) == "mixed"
    assert loss_kind([]) == "training"
    assert "held-out" in LOSS_NOTE["validation"] and "training" in LOSS_NOTE["training"]


# ------------------------------------------------------------------------------------------------
# The figures (synthetic sweeps in the on-disk formats the report reads: sweep.json, metrics.jsonl,
# evals/results.json)

TASKS = {"sSC-EN": (81.0, 65.0), "sTC EN→FR": (51.8, 84.8)}


def _sweep(tmp, budgets):
    import json
    import os

    runs = []
    for b in budgets:
        for ri, rec in enumerate(("en_fr_story", "interleaving_only")):
            for seed in (1, 2):
                arm, rd = f"tiny-{rec}-b{b}", os.path.join(tmp, f"tiny-{rec}-b{b}-s{seed}")
                os.makedirs(os.path.join(rd, "evals"))
                with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
                    for s in (0, 10, 20):
                        f.write(json.dumps({"step": s, "loss": 3.0 - s / 10 - ri / 10, "tokens_seen": s * 100}) + "\n")
                tasks = {t: {"accuracy": (v[ri] + seed) / 100, "items": 20, "chance": 0.5} for t, v in TASKS.items()}
                res = {"step": 20, "scoring": "mean", "tasks": tasks,
                       "alignment": {"align EN-FR": {"cosine": 0.2 + 0.3 * ri, "retrieval": 0.1, "pairs": 20}}}
                json.dump({"checkpoints": [res]}, open(os.path.join(rd, "evals", "results.json"), "w"))
                runs.append({"name": f"{arm}-s{seed}", "arm": arm, "size": "tiny", "recipe": rec, "budget": b,
                             "p": 0.5, "seed": seed, "params": 1000, "tokens": b, "flops": 6000.0 * b, "dir": rd})
    json.dump({"name": "t", "matching": "tokens", "runs": runs}, open(os.path.join(tmp, "sweep.json"), "w"))
    from megaslm.sweeps.report import arms, collect

    return arms(collect(tmp)[1])


def test_one_budget_is_grouped_bars_with_spread_and_chance(tmp_path):
    from megaslm import figures
    from megaslm.sweeps.report import accuracy_figure

    fig = accuracy_figure(_sweep(str(tmp_path), [1000]))
    acc, cos = fig.axes
    assert acc.get_ylim() == (0, 100) and cos.get_ylim() == (0, 1)
    assert [t.get_text() for t in acc.get_xticklabels()] == list(TASKS)
    assert [t.get_text() for t in cos.get_xticklabels()] == ["align EN-FR cosine"]   # not "align align EN-FR"
    assert len(acc.patches) == 4 and sorted(round(b.get_height(), 3) for b in acc.patches) == [53.3, 66.5, 82.5, 86.3]
    spreads = [c for c in acc.containers if getattr(c, "has_yerr", False)]
    assert len(spreads) == 2     # one error-bar set per arm: the spread over the 2 seeds
    chance = [seg[0][1] for c in acc.collections for seg in c.get_segments() if c.get_linestyle()[0][1]]
    assert chance == [50.0, 50.0]
    figures.pyplot().close(fig)


def test_several_budgets_keep_the_curves_on_one_axis(tmp_path):
    from megaslm import figures
    from megaslm.sweeps.report import accuracy_figure

    fig = accuracy_figure(_sweep(str(tmp_path), [1000, 4000]))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == set(TASKS) | {"align EN-FR cosine"}
    for t in TASKS:
        ax = panels[t]
        assert ax.get_ylim() == (0, 100) and ax.get_xscale() == "log"
        assert [l.get_ydata()[0] for l in ax.get_lines() if l.get_linestyle() == "--"] == [50.0]
    assert panels["align EN-FR cosine"].get_ylim() == (0, 1)
    figures.pyplot().close(fig)


def test_one_compute_point_loss_is_bars_from_zero(tmp_path):
    from megaslm.sweeps.report import write_plots

    arm_rows = _sweep(str(tmp_path), [1000])
    paths, fits = write_plots([r for a in arm_rows for r in a["runs"]], arm_rows, str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy_vs_flops.png", "loss_vs_flops.png",
                                                         "loss_vs_tokens.png"]
    assert all("no power-law fit" in f for f in fits)
