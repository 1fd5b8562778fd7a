"""The sweep report's N x N cross-lingual matrices per arm (evals/xling.py through megaslm/sweeps/report.py): a
synthetic 3-language sweep (2 arms x 2 seeds) in the on-disk formats the report reads (sweep.json, metrics.jsonl,
evals/results.json); the cells are mean ± sample standard deviation over the seeds."""
import json
import os

from tests.evals.test_xling import record, table


def _sweep(tmp):
    runs = []
    for arm, seeds in (("en_fr_story", (1, 2)), ("interleaving_only", (3, 5))):
        for seed in seeds:
            rd = os.path.join(tmp, f"{arm}-s{seed}")
            os.makedirs(os.path.join(rd, "evals"))
            with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 10, "loss": 2.0, "tokens_seen": 1000}) + "\n")
            with open(os.path.join(rd, "evals", "results.json"), "w") as f:
                json.dump({"checkpoints": [record(seed)]}, f)
            runs.append({"name": f"{arm}-s{seed}", "arm": arm, "size": "tiny", "recipe": arm, "budget": 1000,
                         "p": 0.5, "seed": seed, "params": 1000, "tokens": 1000, "flops": 6e6, "dir": rd})
    with open(os.path.join(tmp, "sweep.json"), "w") as f:
        json.dump({"name": "t", "matching": "tokens", "runs": runs}, f)


def test_sweep_report_writes_the_matrices_per_arm(tmp_path):
    from megaslm import figures
    from megaslm.sweeps.report import write_report

    _sweep(str(tmp_path))
    out = write_report(str(tmp_path))
    rep = tmp_path / "report"
    assert sorted(os.path.relpath(p, rep) for p in out["matrices"]) == [
        "align_matrix.md", "align_matrix.png", "xling_sSC.md", "xling_sSC.png", "xling_sTC.md", "xling_sTC.png"]
    md = open(rep / "xling_sTC.md").read()
    base, corner = table(md, "## en_fr_story")
    inter = table(md, "## interleaving_only")[0]
    assert corner == "context \\ ending" and list(base) == ["EN", "FR", "DE"]
    # FR context, DE ending: 66 + 2 * seed: seeds 1, 2 -> 68, 70 = 69.0 ± 1.4; seeds 3, 5 -> 72, 76 = 74.0 ± 2.8
    assert base["FR"]["DE"] == "69.0 ± 1.4" and inter["FR"]["DE"] == "74.0 ± 2.8"
    assert "over 2 seeds" in md
    al = table(open(rep / "align_matrix.md").read(), "## interleaving_only")[0]
    # EN-FR (k = 0) cosine per layer 0.1 + 0.01 seed (l + 1), mean over 2 layers = 0.1 + 0.015 seed: 0.145, 0.175
    assert al["FR"]["EN"] == al["EN"]["FR"] == "0.160 ± 0.021" and al["EN"]["EN"] == "–"
    # the paper-layout table is unchanged: its own columns, the matrices beside it
    assert out["table"].startswith("| arm | params | tokens | seeds | final loss | sSC-EN | sSC-FR | sTC-EN | sTC-FR | "
                                    "sSC EN→FR | sSC FR→EN | sTC EN→FR | sTC FR→EN | sBLIMP |")
    row = next(l for l in out["table"].splitlines() if l.startswith("| en_fr_story"))
    assert row.split(" | ")[11] == "56.0 ± 1.4"       # sTC EN→FR: 53 + 2 * seed (same cells as the matrix)
    figures.pyplot().close("all")
