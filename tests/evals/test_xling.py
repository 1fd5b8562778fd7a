"""The N x N cross-lingual matrices (evals/xling.py) and the eval report's matrix files: synthetic result records in
the format launchers/eval.py writes (results.json's checkpoints) for a 3-language world (en, fr, de), 2 seeds;
values checked against hand computation, the tables' layout (rows = context, columns = ending), the heatmaps'
cells, annotations and chance tick."""
import itertools
import math
import os

import pytest

from evals.benchmarks import task_key
from evals.report import markdown_table, write_reports
from evals.xling import align_tables, languages_of, task_figure, task_matrix, write_matrix_files
from megaslm import figures

LANGS = ["en", "fr", "de"]
BENCH = ("sSC", "sTC")


def accuracy(bench, ctx, end, seed):
    """A distinct accuracy per cell and seed: monolingual 80, cross 50 + 10 * row + 3 * column, + seed (* 2 for sTC)."""
    i, j = LANGS.index(ctx), LANGS.index(end)
    return (80.0 if i == j else 50.0 + 10 * i + 3 * j) + seed * (2 if bench == "sTC" else 1)


def record(seed, langs=LANGS, layers=2):
    tasks = {task_key(b, [a, c]): {"accuracy": accuracy(b, a, c, seed) / 100, "items": 100, "chance": 0.5}
             for b in BENCH for a in langs for c in langs}
    tasks["sBLIMP"] = {"accuracy": 0.6, "items": 100, "chance": 0.5}
    al = {}
    for k, (a, b) in enumerate(itertools.combinations(langs, 2)):
        cos = [0.1 * (k + 1) + 0.01 * seed * (l + 1) for l in range(layers)]
        ret = [0.05 * (k + 1) * seed + 0.1 * l for l in range(layers)]
        al[task_key("align", [a, b])] = {"cosine_per_layer": cos, "retrieval_per_layer": ret, "pairs": 20,
                                         "cosine": sum(cos) / layers, "retrieval": sum(ret) / layers}
    return {"tag": "step00000300", "step": 300, "scoring": "mean_continuation", "tasks": tasks, "alignment": al}


@pytest.fixture(autouse=True)
def _close():
    yield
    figures.pyplot().close("all")


def table(md, heading):
    """{row label: {column label: cell}} of the first Markdown table after ``heading``."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in itertools.takewhile(
        lambda l: l.startswith("|"), lines[start:])]
    head = rows[0]
    return {r[0]: dict(zip(head[1:], r[1:])) for r in rows[2:]}, head[0]


def test_matrix_is_mean_and_sample_spread_over_seeds():
    recs = [record(1), record(2)]
    langs = languages_of(recs)
    assert langs == ["EN", "FR", "DE"]        # the paper's languages first, then alphabetical
    m = task_matrix(recs, "sTC", langs)
    assert m["chance"] == 50.0 and m["items"] == 100
    # FR context (row 1), DE ending (column 2): 50 + 10 + 6 = 66, + 2 * seed -> 68, 70: mean 69, sd sqrt(2)
    mean, sd, n = m["cells"][1][2]
    assert (mean, n) == (pytest.approx(69.0), 2) and sd == pytest.approx(math.sqrt(2))
    assert m["cells"][0][0][0] == pytest.approx(83.0)                      # monolingual EN: 80 + 2 * 1.5
    assert task_matrix(recs, "sSC", langs)["cells"][2][0][:2] == (pytest.approx(71.5), pytest.approx(math.sqrt(.5)))
    one = task_matrix([record(1)], "sTC", langs)["cells"][1][2]
    assert one == (pytest.approx(68.0), 0.0, 1)


def test_alignment_matrix_is_symmetric_per_layer_and_mean():
    t = align_tables([record(1), record(2)], ["EN", "FR", "DE"])
    assert t["pairs"] == [("EN", "FR"), ("EN", "DE"), ("FR", "DE")] and t["chance"] == pytest.approx(5.0)
    cos = t["cosine"]["matrix"]
    assert cos[0][0] is None and cos[1][2] == cos[2][1]
    # FR-DE (k = 2): layer 0 cosine 0.3 + 0.01 seed, layer 1 0.3 + 0.02 seed: over seeds 0.315 and 0.33
    assert [c[0] for c in t["cosine"]["layers"][("FR", "DE")]] == [pytest.approx(0.315), pytest.approx(0.33)]
    assert cos[1][2][0] == pytest.approx((0.315 + 0.33) / 2)
    # retrieval in %: EN-DE (k = 1) layer 0: 10 * seed -> 10, 20: mean 15, sd sqrt(50)
    r = t["retrieval"]["layers"][("EN", "DE")][0]
    assert r[0] == pytest.approx(15.0) and r[1] == pytest.approx(math.sqrt(50))


def test_markdown_rows_are_context_columns_ending(tmp_path):
    paths = write_matrix_files(str(tmp_path), {"arm a": [record(1), record(2)], "arm b": [record(3)]}, fsync=False)
    assert sorted(os.path.basename(p) for p in paths) == ["align_matrix.md", "align_matrix.png", "xling_sSC.md",
                                                          "xling_sSC.png", "xling_sTC.md", "xling_sTC.png"]
    md = open(tmp_path / "xling_sTC.md").read()
    rows, corner = table(md, "## arm a")
    assert corner == "context \\ ending" and list(rows) == ["EN", "FR", "DE"] and list(rows["EN"]) == ["EN", "FR", "DE"]
    assert rows["FR"]["DE"] == "69.0 ± 1.4" and rows["DE"]["FR"] == "76.0 ± 1.4"   # 50 + 20 + 3 + 2 * 1.5
    assert table(md, "## arm b")[0]["FR"]["DE"] == "72.0"                           # one seed: no spread
    al = open(tmp_path / "align_matrix.md").read()
    assert table(al, "cosine, mean over layers")[0]["DE"]["FR"] == "0.323 ± 0.011"
    per_layer = al[al.index("per layer"):]
    assert "| EN-DE | retrieval@1 (%) | 15.0 ± 7.1 | 25.0 ± 7.1 |" in per_layer


def test_heatmap_cells_annotations_and_chance_tick():
    recs = [record(1), record(2)]
    langs = languages_of(recs)
    mats = {"arm": task_matrix(recs, "sTC", langs)}
    fig = task_figure("sTC", mats, {"arm": 2})
    ax = fig.axes[0]
    img = ax.get_images()[0]
    data = img.get_array()
    assert data.shape == (3, 3) and data[1, 2] == pytest.approx(69.0) and data[2, 1] == pytest.approx(76.0)
    assert img.norm.vmin == 0 and img.norm.vmax == 100 and img.norm(50.0) == pytest.approx(0.5)   # white at chance
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts[(1, 2)] == "69.0 ± 1.4" and len(texts) == 9
    assert [t.get_text() for t in ax.get_yticklabels()] == ["EN", "FR", "DE"] == [
        t.get_text() for t in ax.get_xticklabels()]
    assert ax.get_ylabel() == "context language" and ax.get_xlabel() == "ending language"
    cbar = fig.axes[1]
    labels = {round(v, 3): t.get_text() for v, t in zip(cbar.get_yticks(), cbar.get_yticklabels())}
    assert labels[50.0] == "50 chance" and labels[0.0] == "0" and labels[100.0] == "100"
    assert len(ax.patches) == 3        # the monolingual diagonal boxed


def test_eval_report_adds_matrix_files_only(tmp_path):
    """Three languages: the newest checkpoint's matrices (one record: no spread); two languages: the paper's
    results.md as before, plus the 2 x 2 matrix files."""
    out = write_reports([record(1, layers=3)], str(tmp_path / "three"))
    assert sorted(os.path.basename(p) for p in out["matrices"]) == [
        "align_matrix.md", "align_matrix.png", "xling_sSC.md", "xling_sSC.png", "xling_sTC.md", "xling_sTC.png"]
    md = open(tmp_path / "three" / "xling_sSC.md").read()
    assert "## step00000300" in md and "±" not in md and table(md, "## step")[0]["DE"]["EN"] == "71.0"
    assert "layer 3" in open(tmp_path / "three" / "align_matrix.md").read()
    two = [record(1, ["en", "fr"])]
    out = write_reports(two, str(tmp_path / "two"))
    assert open(out["markdown"]).read() == markdown_table(two)
    head = open(out["markdown"]).read().splitlines()[1]
    assert head.startswith("| checkpoint | sSC-EN | sSC-FR | sTC-EN | sTC-FR | sSC EN→FR | sSC FR→EN | sTC EN→FR |")
    assert sorted(os.listdir(tmp_path / "two")) == ["align_matrix.md", "align_matrix.png", "evals.png",
                                                   "results.json", "results.md", "xling_sSC.md", "xling_sSC.png",
                                                   "xling_sTC.md", "xling_sTC.png"]
    assert list(table(open(tmp_path / "two" / "xling_sTC.md").read(), "## step")[0]) == ["EN", "FR"]
