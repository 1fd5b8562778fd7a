"""The same checkpoint scored at TP=1/PP=1/DP=4, TP=2/DP=2, PP=2/DP=2 and TP=2 x PP=2 (CPU, gloo, fp32):
identical per-item log-likelihoods (1e-5), accuracies, alignment and samples; agreement with an
independent single-process log-softmax; near-100% on a benchmark whose answers are known by
construction and near-50% untrained; the launcher end to end. Two spawned groups in all."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [["parallel.tensor=1", "parallel.pipeline=1"], ["parallel.tensor=2", "parallel.pipeline=1"],
           ["parallel.tensor=1", "parallel.pipeline=2"], ["parallel.tensor=2", "parallel.pipeline=2"]]


@pytest.fixture(scope="module")
def layouts(trained):
    res = run_ranks(4, "tests.evals.eval_workers:layouts", trained["ckpt"], trained["bench"], LAYOUTS,
                    str(trained["dir"] / "tp2pp2"))
    return res


def _by_key(per_item):
    return {(r["task"], r["id"]): r for r in per_item}


def test_layouts_agree(layouts):
    for rank_res in layouts:              # every rank returns the same answer
        assert [l["tasks"] for l in rank_res["layouts"]] == [l["tasks"] for l in layouts[0]["layouts"]]
    ls = layouts[0]["layouts"]
    assert [(l["tp"], l["pp"], l["dp"]) for l in ls] == [(1, 1, 4), (2, 1, 2), (1, 2, 2), (2, 2, 1)]
    ref = _by_key(ls[0]["per_item"])
    ref_sum = _by_key(ls[0]["per_item_sum"])
    assert len(ref) == 400
    for l in ls[1:]:
        assert l["tasks"] == ls[0]["tasks"] and l["tasks_sum"] == ls[0]["tasks_sum"]
        for key, r in _by_key(l["per_item"]).items():
            for a, b in zip(r["logprob_sum"], ref[key]["logprob_sum"]):
                assert abs(a - b) < 1e-5, (l["overrides"], key)
            for a, b in zip(r["scores"], ref[key]["scores"]):
                assert abs(a - b) < 1e-5
        for key, r in _by_key(l["per_item_sum"]).items():
            for a, b in zip(r["scores"], ref_sum[key]["scores"]):
                assert abs(a - b) < 1e-5
        a0, a1 = ls[0]["alignment"]["align EN-FR"], l["alignment"]["align EN-FR"]
        assert max(abs(x - y) for x, y in zip(a0["cosine_per_layer"], a1["cosine_per_layer"])) < 1e-5
        assert a0["retrieval_per_layer"] == a1["retrieval_per_layer"]
        assert l["greedy"] == ls[0]["greedy"] and l["sampled"] == ls[0]["sampled"]
    assert len(ls[0]["greedy"]) == 12 and all(0 <= u < 128 for u in ls[0]["sampled"])
    assert len(ls[0]["alignment"]["align EN-FR"]["cosine_per_layer"]) == 4


def test_matches_independent_log_softmax(layouts):
    l0 = layouts[0]["layouts"][0]
    by = _by_key(l0["per_item"])
    ids = {r["id"]: r for r in l0["per_item"]}
    worst = 0.0
    for (iid, k), ref in zip(l0["reference_ids"], l0["reference"]):
        rec = ids[iid]
        worst = max(worst, abs(sum(ref) - rec["logprob_sum"][k]))
        assert rec["num_tokens"][k] == len(ref)
        assert abs(sum(ref) / len(ref) - rec["scores"][k]) < 1e-5
    assert worst < 1e-4, worst
    assert len(by) == len(ids)


def test_known_answers_and_untrained(layouts):
    l0 = layouts[0]["layouts"][0]
    t = l0["tasks"]
    for task in ("sSC-EN", "sSC-FR", "sSC EN→FR", "sSC FR→EN", "sWUGGY"):
        assert t[task]["accuracy"] >= 0.95, (task, t[task])
    rnd = l0["random_tasks"]
    pooled = sum(v["accuracy"] * v["items"] for v in rnd.values()) / sum(v["items"] for v in rnd.values())
    assert 0.35 <= pooled <= 0.65, rnd


def test_checkpoint_saved_at_tp2_pp2_reads_back(layouts):
    assert layouts[0]["tp2pp2_keys_equal"] and layouts[0]["tp2pp2_max_diff"] == 0.0


def test_training_hook(layouts, trained):
    hook = layouts[0]["layouts"][3]["hook"]
    assert hook["eval/sSC-EN"] == layouts[0]["layouts"][0]["tasks"]["sSC-EN"]["accuracy"]
    assert "eval/align EN-FR/cosine" in hook
    lines = open(trained["dir"] / "tp2pp2" / "evals" / "results.jsonl").read().splitlines()
    assert json.loads(lines[-1])["step"] == 5


def test_launcher_end_to_end(trained):
    out = str(trained["dir"] / "report")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint", trained["run"],
                        "--benchmarks", trained["bench"], "--out", out, "eval.max_items=10"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "MASTER_PORT": str(free_port())})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(os.path.join(out, "results.json")))["checkpoints"]
    assert [r["step"] for r in res] == [20, 40]
    assert res[-1]["tasks"]["sSC-EN"]["items"] == 10
    md = open(os.path.join(out, "results.md")).read()
    assert "| checkpoint | sSC-EN | sSC-FR | sTC-EN | sTC-FR | sSC EN→FR |" in md and "step00000040" in md
    assert os.path.exists(os.path.join(out, "evals.png"))
    assert os.path.exists(os.path.join(out, "step00000040.items.jsonl"))
    # a benchmark made for another vocabulary: one line, exit 2
    from megaslm.vocab import UnitVocab
    from evals.benchmarks import write_manifest
    import shutil

    bad = str(trained["dir"] / "bench_bad")
    shutil.copytree(trained["bench"], bad)
    write_manifest(bad, UnitVocab(codebook_size=256))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint", trained["ckpt"],
                        "--benchmarks", bad, "--out", out], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "MASTER_PORT": str(free_port())})
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "manifest.json" in last and "codebook_size" in last
