"""The eval figure (evals/report.py): one per run, accuracies on 0-100 % with chance drawn, whole-step ticks,
a bar chart for a single evaluated step, the evaluations during training on the same panels. Synthetic result
records in the formats launchers/eval.py (results.json) and evals/hooks.py (results.jsonl) write."""
import json
import os

import pytest

from evals.report import eval_figure, metric_series, read_training_results, training_results_path, write_reports
from evals.scoring import accuracies
from megaslm import figures

TASKS = ["sSC-EN", "sTC EN→FR", "sBLIMP"]


def _rec(step, acc=0.7, chance=0.5):
    return {"tag": f"step{step:08d}", "step": step, "scoring": "mean",
            "tasks": {t: {"accuracy": acc, "items": 20, "chance": chance} for t in TASKS},
            "alignment": {"align EN-FR": {"cosine": 0.4, "retrieval": 0.3, "pairs": 20}}}


def _panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _chance_lines(ax):
    return [l.get_ydata()[0] for l in ax.get_lines() if l.get_linestyle() == "--"]


@pytest.fixture(autouse=True)
def _close():
    yield
    figures.pyplot().close("all")


def test_chance_is_the_mean_of_one_over_candidates():
    per = [{"task": "t", "credit": 1.0, "scores": [0, 1]}, {"task": "t", "credit": 0.0, "scores": [0, 1, 2, 3]}]
    assert accuracies(per)["t"] == {"accuracy": 0.5, "items": 2, "chance": pytest.approx(0.375)}


def test_curves_across_checkpoints_and_training_evals():
    fig = eval_figure([_rec(200), _rec(300)], during_training=[_rec(s, 0.6) for s in (50, 100, 150, 200)])
    p = _panels(fig)
    assert set(p) == set(TASKS) | {"align EN-FR retrieval@1", "align EN-FR cosine"}
    for t in TASKS:
        ax = p[t]
        assert ax.get_ylim() == (0, 100) and _chance_lines(ax) == [50.0]
        assert {l.get_label() for l in ax.get_lines()} >= {"during training", "kept checkpoints"}
        ticks = ax.get_xticks()
        assert list(ticks) == [50, 100, 150, 200, 300] and all(float(x).is_integer() for x in ticks)
    assert _chance_lines(p["align EN-FR retrieval@1"]) == [pytest.approx(5.0)]   # 1 of 20 pairs
    cos = p["align EN-FR cosine"]
    assert cos.get_ylim() == (0, 1) and _chance_lines(cos) == [] and "cosine" in cos.get_ylabel()


def test_many_steps_get_whole_number_ticks():
    fig = eval_figure([_rec(s) for s in range(0, 1001, 37)])
    ax = _panels(fig)["sSC-EN"]
    assert len(ax.get_xticks()) <= 8 and all(float(x).is_integer() for x in ax.get_xticks())


def test_one_checkpoint_is_a_bar_chart_with_chance():
    fig = eval_figure([_rec(300, 0.9, chance=1 / 3)])
    acc, cos = fig.axes[:2]
    assert len(acc.patches) == len(TASKS) + 1 and len(cos.patches) == 1   # bars, not dots
    heights = sorted(round(b.get_height(), 6) for b in acc.patches)
    assert heights == [30.0, 90.0, 90.0, 90.0]
    assert acc.get_ylim() == (0, 100) and cos.get_ylim() == (0, 1)
    chance = sorted(round(seg[0][1], 4) for c in acc.collections for seg in c.get_segments())
    assert chance == [5.0, 33.3333, 33.3333, 33.3333]
    assert "step 300" in fig._suptitle.get_text()


def test_results_without_a_chance_field_are_pairs():
    r = _rec(10)
    for v in r["tasks"].values():
        del v["chance"]
    assert metric_series([r])["sSC-EN"]["chance"] == 50.0


def test_exactly_one_figure_per_run(tmp_path):
    run = tmp_path / "run"
    (run / "evals").mkdir(parents=True)
    with open(run / "evals" / "results.jsonl", "w") as f:
        for s in (50, 100, 100):    # a resumed run re-evaluates step 100: the last record wins
            f.write(json.dumps({**_rec(s, 0.55 if s == 50 else 0.6), "step": s}) + "\n")
        f.write('{"step": 150, "tas')   # cut by a kill
    training = read_training_results(str(run / "evals" / "results.jsonl"))
    assert [r["step"] for r in training] == [50, 100]
    out = write_reports([_rec(100)], str(run / "evals"), training)
    assert out["plots"] == [str(run / "evals" / "evals.png")]
    assert sorted(os.listdir(run / "evals")) == ["align_matrix.md", "align_matrix.png", "evals.png", "results.json",
                                                 "results.jsonl", "results.md", "xling_sSC.md", "xling_sSC.png",
                                                 "xling_sTC.md", "xling_sTC.png"]   # the figure + evals/xling.py's
    assert read_training_results(str(tmp_path / "nope.jsonl")) == []
    assert write_reports([{"step": 1, "tasks": {}, "alignment": {}}], str(tmp_path / "empty"))["plots"] == []


def test_training_results_path_of_a_checkpoint():
    assert training_results_path("/r/run/checkpoints/step00000010") == "/r/run/evals/results.jsonl"
    assert training_results_path("/r/ck/step00000010") == "/r/ck/evals/results.jsonl"
