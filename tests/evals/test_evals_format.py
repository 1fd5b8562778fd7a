"""Benchmark format validation, scoring conventions, reports, config section (single process, no groups)."""
import json
import os
import subprocess
import sys

import pytest

from megaslm.vocab import UnitVocab
from evals.benchmarks import encode, load_benchmark, task_key, write_manifest
from evals.errors import EvalError
from evals.report import markdown_table, write_reports
from evals.scoring import item_credit, utterance_score

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = UnitVocab(codebook_size=16)
GOOD = {"id": "a", "benchmark": "sSC", "languages": ["en", "fr"], "context": [1, 2], "candidates": [[3], [4, 5]], "correct": 1}


def _bench(tmp_path, rows, vocab=V):
    write_manifest(str(tmp_path), vocab)
    with open(tmp_path / "b.jsonl", "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(tmp_path)


def test_load_and_tasks(tmp_path):
    rows = [GOOD, {**GOOD, "id": "b", "languages": ["en", "en"], "correct": [True, False]},
            {"id": "w", "benchmark": "sWUGGY", "languages": ["en"], "candidates": [[1, 2], [2, 1]], "correct": 0},
            {"id": "p", "benchmark": "align", "languages": ["en", "fr"], "utterances": [[1], [2, 3]]}]
    b = load_benchmark(_bench(tmp_path, rows))
    assert sorted(b.tasks()) == ["align EN-FR", "sSC EN→FR", "sSC-EN", "sWUGGY"]
    assert b.items[1].correct == 0
    assert task_key("sTC", ["fr", "en"]) == "sTC FR→EN"


@pytest.mark.parametrize("row,needle", [
    ({**GOOD, "correct": [True, True]}, "exactly one candidate must be correct"),
    ({**GOOD, "correct": 2}, "field 'correct'"),
    ({**GOOD, "candidates": [[3], [4, 16]]}, "candidates[1][1]': unit 16 outside the vocabulary"),
    ({**GOOD, "candidates": [[3]]}, "at least two"),
    ({**GOOD, "languages": ["en", "de"]}, "'de' not in the manifest"),
    ({**GOOD, "benchmark": "xyz"}, "field 'benchmark'"),
    ({**GOOD, "extra": 1}, "unknown field"),
    ("{not json", "invalid JSON"),
])
def test_bad_items_name_file_line_item(tmp_path, row, needle):
    d = _bench(tmp_path, [GOOD, row] if not isinstance(row, str) else [GOOD, row])
    with pytest.raises(EvalError) as e:
        load_benchmark(d)
    msg = str(e.value)
    assert needle in msg and f"{os.path.join(d, 'b.jsonl')}:2" in msg


def test_missing_files(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        load_benchmark(str(tmp_path / "nope"))
    (tmp_path / "x.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(EvalError, match="manifest.json: benchmark manifest not found"):
        load_benchmark(str(tmp_path))
    dup = _bench(tmp_path, [GOOD, GOOD])
    with pytest.raises(EvalError, match="duplicate id"):
        load_benchmark(dup)


def test_vocab_mismatch_and_encoding():
    from evals.benchmarks import check_vocab

    with pytest.raises(EvalError, match="dedup: benchmark True vs checkpoint False"):
        check_vocab(UnitVocab(codebook_size=16, dedup=True), V, "bench/manifest.json")
    toks, start = encode(V, [1, 2], [3, 4], add_bos=False)
    assert toks == [V.offset + u for u in (1, 2, 3, 4)] and start == 2
    dd = UnitVocab(codebook_size=16, dedup=True)
    toks, start = encode(dd, [1, 2, 2], [2, 3], add_bos=True)   # dedup across the boundary
    assert toks == [dd.bos_id, dd.offset + 1, dd.offset + 2, dd.offset + 3] and start == 3


def test_scoring_conventions():
    lp = [-1.0, -2.0, -3.0, -4.0]          # tokens 1..4 of a 5-token utterance, candidate from token 3
    assert utterance_score(lp, 3, "mean") == -2.5
    assert utterance_score(lp, 3, "sum_continuation") == -7.0
    assert utterance_score(lp, 0, "sum_continuation") == -10.0
    assert item_credit([-1.0, -2.0], 0) == 1.0 and item_credit([-1.0, -1.0], 1) == 0.5
    assert item_credit([-1.0, -1.0, -1.0], 2) == pytest.approx(1 / 3) and item_credit([-3.0, -1.0], 0) == 0.0


def test_reports(tmp_path):
    res = [{"tag": f"step{s:08d}", "step": s, "scoring": "mean",
            "tasks": {"sSC-EN": {"accuracy": 0.5 + s / 1000, "items": 4}, "sBLIMP": {"accuracy": 0.6, "items": 4},
                      "sTC FR→EN": {"accuracy": 0.7, "items": 4}},
            "alignment": {"align EN-FR": {"cosine": 0.73, "retrieval": 0.5}}} for s in (10, 20)]
    md = markdown_table(res)
    assert "| step00000020 | 52.00 | – | – | – | – | – | – | 70.00 | 60.00 | – | 0.73 |" in md
    out = write_reports(res, str(tmp_path))
    assert out["plots"] == [str(tmp_path / "evals.png")] and os.path.getsize(out["plots"][0]) > 1000
    assert json.load(open(out["json"]))["checkpoints"][1]["step"] == 20


def test_eval_config_section():
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["eval.interval=50", "eval.benchmarks=[b1]"])
    assert cfg.eval.interval == 50 and cfg.eval.scoring == "mean"
    with pytest.raises(ConfigError, match="eval.scoring"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["eval.scoring=max"])


def test_launcher_missing_checkpoint(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint",
                        str(tmp_path / "nope"), "--benchmarks", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: checkpoint or run directory not found"


def test_evals_never_imports_train():
    import ast

    for fn in os.listdir(os.path.join(ROOT, "evals")):
        if fn.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "evals", fn)).read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.startswith("megaslm.train") for n in names), fn


# ------------------------------------------------------------------------------------------------
# Benchmarks that cannot be scored: refused in one line, before any model is built
# ------------------------------------------------------------------------------------------------
def test_empty_benchmark_file_is_refused(tmp_path):
    """An empty file (or blank lines only), passed directly or as a member of a folder, is one line naming
    it -- scored, it would be a table of dashes and exit 0."""
    for text in ("", "\n  \n"):
        d = tmp_path / f"d{len(text)}"
        write_manifest(str(d), V)
        (d / "b.jsonl").write_text(text)
        for given in (str(d / "b.jsonl"), str(d)):
            with pytest.raises(EvalError) as e:
                load_benchmark(given)
            assert str(e.value) == (f"{d / 'b.jsonl'}: empty benchmark file (no items); expected one JSON item "
                                    f"per line (docs/evals.md)")
    # a folder with one good member and one empty one: the empty one is named
    d = _bench(tmp_path / "mixed", [GOOD])
    (tmp_path / "mixed" / "z.jsonl").write_text("")
    with pytest.raises(EvalError, match=r"mixed/z\.jsonl: empty benchmark file"):
        load_benchmark(d)


def _fake_run(tmp_path, vocab_overrides=("vocab.codebook_size=16",)):
    """A run directory with one checkpoint whose meta.json records the config (a canonical checkpoint whose
    model.safetensors is garbage: reading it would fail, so a test that passes never read it)."""
    from megaslm.checkpoint.layout import tag_for
    from megaslm.config_io import load_config

    cfg = load_config(None, [*vocab_overrides, "data.demo=true"])   # valid as a run records it (eval checks it)
    tag = tmp_path / "run" / "checkpoints" / tag_for(10)
    tag.mkdir(parents=True)
    (tag / "model.safetensors").write_bytes(b"not a safetensors file")
    (tag / "meta.json").write_text(json.dumps({"step": 10, "config": cfg.to_dict()}))
    return str(tmp_path / "run"), str(tag), cfg


@pytest.mark.parametrize("case", ["unit", "manifest", "empty"])
def test_benchmarks_checked_against_the_checkpoint_before_the_model(tmp_path, monkeypatch, case):
    """A unit outside the checkpoint's vocabulary, a manifest for another vocabulary, an empty file: found
    from the config the checkpoint records, before any model is built (the builders raise if called)."""
    import evals.engine
    import evals.runner

    def no_model(*a, **k):
        raise AssertionError("a model was built before the benchmarks were checked")

    monkeypatch.setattr(evals.runner, "load_checkpoint_model", no_model)
    monkeypatch.setattr(evals.engine, "build_eval_model", no_model)
    run, tag, cfg = _fake_run(tmp_path)
    assert cfg.vocab == V
    if case == "unit":
        d = _bench(tmp_path / "bench", [GOOD, {**GOOD, "id": "b", "candidates": [[3], [4, 16]]}])
        expected = (f"{d}/b.jsonl:2: item 'b': field 'candidates[1][1]': unit 16 outside the vocabulary "
                    f"(codebook 0..15)")
    elif case == "manifest":
        d = _bench(tmp_path / "bench", [{**GOOD, "candidates": [[3], [4, 2000]]}], UnitVocab(codebook_size=2048))
        expected = (f"{d}/manifest.json: vocabulary does not match the checkpoint's (codebook_size: benchmark 2048 "
                    f"vs checkpoint 16)")
    else:
        d = _bench(tmp_path / "bench", [])
        expected = f"{d}/b.jsonl: empty benchmark file (no items); expected one JSON item per line (docs/evals.md)"
    for where in (run, tag):
        with pytest.raises(EvalError) as e:
            evals.runner.evaluate_path(where, [d], out_dir=str(tmp_path / "out"))
        assert str(e.value) == expected
        with pytest.raises(EvalError) as e:
            evals.runner.evaluate_checkpoint(tag, [d])
        assert str(e.value) == expected
    # the benchmarks named by the checkpoint's eval.benchmarks (here through an override) are checked too
    with pytest.raises(EvalError) as e:
        evals.runner.evaluate_path(run, [], overrides=[f"eval.benchmarks=[{d}]"])
    assert str(e.value) == expected
    assert not (tmp_path / "out").exists()


def test_launcher_refuses_a_bad_benchmark_before_reading_the_weights(tmp_path):
    """Through launchers/eval.py: exit 2, the one line naming the benchmark, not the (garbage) weights."""
    run, tag, cfg = _fake_run(tmp_path)
    d = _bench(tmp_path / "bench", [GOOD, {**GOOD, "id": "b", "candidates": [[3], [4, 16]]}])
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint", run,
                        "--benchmarks", d, "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    err = [l for l in p.stderr.splitlines() if l.strip() and "Warning" not in l and "warnings.warn" not in l]
    assert p.returncode == 2, p.stderr[-2000:]
    assert err[-1] == (f"error: {d}/b.jsonl:2: item 'b': field 'candidates[1][1]': unit 16 outside the "
                       f"vocabulary (codebook 0..15)"), p.stderr[-2000:]
    assert not (tmp_path / "out").exists()
