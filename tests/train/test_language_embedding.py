"""model.language_embedding: the language side channel through megatron's datasets, training with the
language table (gradient, save -> resume bit-identical), TP=2 / PP=2 vs TP=1, the missing-channel error,
reshard / HF export, and the evals feeding per-token language ids."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from _train_helpers import ROOT, launch_env, tiny_config
from tests.distributed import run_ranks

LANG = "embedding.word_embeddings.lang_weight"


def _config(tmp_path, corpus):
    # stage "en": 2 steps on English only; stage "mix": 2 steps on an EN + FR blend. No weight decay, so a
    # table row changes only through its gradient.
    return tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=[
        {"name": "en", "train_steps": 2, "data": [{"path": corpus["en"], "weight": 1.0}]},
        {"name": "mix", "train_steps": 2, "data": [{"path": corpus["en"], "weight": 0.5},
                                                   {"path": corpus["fr"], "weight": 0.5}]},
    ], model={"language_embedding": True}, optimizer={"weight_decay": 0.0}, checkpoint={"interval": 2, "keep_last": 5})


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("lang")
    cfg = _config(tmp, corpus)
    [res] = run_ranks(1, "tests.train.lang_cases:single", cfg, str(tmp), timeout=500)
    res["dir"] = str(tmp)
    return res


def test_language_ids_line_up_with_the_tokens(single):
    from megaslm.config_io import load_config

    vocab = load_config(None, ["vocab.codebook_size=128"]).vocab
    en, fr = vocab.lang_id("en"), vocab.lang_id("fr")
    seen = set()
    for stage, samples in single["datasets"].items():
        for s in samples:
            toks, lang = s["tokens"], s["lang_ids"]
            # the same samples, in the same order, as megatron's plain GPTDataset
            assert toks == s["plain_tokens"] and s["labels"] == s["plain_labels"]
            assert len(lang) == len(toks) == 32
            # every special token (eod here) has language 0, every unit its document's language
            want = en if stage == "en" or s["dataset_id"] == 0 else fr
            assert [0 if t < vocab.offset else want for t in toks] == lang, (stage, s["dataset_id"])
            seen.add((stage, s["dataset_id"]))
    assert seen == {("en", 0), ("mix", 0), ("mix", 1)}  # the blend drew from both datasets


def test_training_updates_the_table_and_resumes_bit_identically(single):
    full, resumed = single["losses"]
    assert len(full) == 4 and all(map(lambda x: x == x and abs(x) < 1e3, full))
    assert full == resumed
    v_full, v_resumed = single["valid"]                # the held-out loss, with language ids
    assert [s for s, _ in v_full] == [2, 4] and v_full == v_resumed
    assert all(0 < x < 10 for _, x in v_full)
    assert single["weights_differ"] == []   # every tensor of the step-4 checkpoints bit-identical
    assert LANG in single["weights_keys"] and single["lang_resumed"] == single["lang"]["step00000004"]
    # init: the layout-independent draw of megaslm.model.init_weights
    from megaslm.config_io import load_config
    from megaslm.model import _param_seed

    cfg = load_config(os.path.join(single["dir"], "c.yaml"))
    g = torch.Generator().manual_seed(_param_seed(cfg.seed, LANG))
    init = torch.randn(3, 32, generator=g) * cfg.model.init_method_std
    at2, at4 = (torch.tensor(single["lang"][t]) for t in ("step00000002", "step00000004"))
    # after the English stage: the "en" row moved, the "fr" row (no French token seen) did not. (Row 0,
    # "none", moves only if a step's samples held an eod: the stories can be longer than a step.)
    assert not torch.equal(at2[1], init[1])
    assert torch.equal(at2[2], init[2])
    # after the blend: French tokens gave the "fr" row its gradient
    assert not torch.equal(at4[2], init[2])


def test_tensor_and_pipeline_parallel_match_one_rank(single):
    ref = single["tp1"]
    res = run_ranks(2, "tests.train.lang_cases:lang_layouts", os.path.join(ROOT, "configs", "tiny.yaml"),
                    [["model.language_embedding=true", "parallel.tensor=2"],
                     ["model.language_embedding=true", "parallel.pipeline=2"],
                     # sequence parallel: the fused embedding reduce-scatters along the sequence
                     ["model.language_embedding=true", "parallel.tensor=2", "parallel.sequence_parallel=true"]],
                    timeout=500)
    for rank in res:
        for r in rank:
            assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(r["losses"], ref["losses"])), (r, ref["losses"])
            assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r["grad_norms"], ref["grad_norms"]))
    for case in (0, 2):
        tp = [torch.tensor(rank[case]["lang_weight"]) for rank in res]
        # both TP ranks hold the same table (added on rank 0, gradient on both), equal to the TP=1 one
        assert torch.equal(tp[0], tp[1])
        assert torch.allclose(tp[0], torch.tensor(ref["lang_weight"]), rtol=1e-4, atol=1e-5)
    assert res[0][1]["lang_weight"] is not None and res[1][1]["lang_weight"] is None  # PP: first stage only


def test_a_dataset_without_the_side_channel_is_one_line(tmp_path, corpus):
    name = os.path.basename(corpus["en"])
    d = tmp_path / "d"
    d.mkdir()
    p = str(d / name)
    for suffix in (".bin", ".idx", ".manifest.json"):
        shutil.copy(corpus["en"] + suffix, p + suffix)
    m = json.load(open(p + ".manifest.json"))
    del m["lang_channel"]
    json.dump(m, open(p + ".manifest.json", "w"))
    out = tmp_path / "run"
    stages = f"schedule.stages=[{{name: a, train_steps: 2, data: [{{path: {corpus['fr']}, weight: 1.0}}]}}, " \
             f"{{name: b, train_steps: 2, data: [{{path: {p}, weight: 1.0}}]}}]"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "data.demo=false",
                        "vocab.codebook_size=128", f"output_dir={out}", "model.language_embedding=true", stages],
                       cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: dataset {p}: model.language_embedding=true"), r.stderr
    assert not out.exists()
    # the same data without the language embedding is fine (the channel is optional then)
    from megaslm.data import check_manifest
    from megaslm.config_io import load_config

    check_manifest(p, load_config(None, ["vocab.codebook_size=128"]).vocab)


def test_config_refuses_megatron_embedding_with_the_table():
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config

    with pytest.raises(ConfigError, match="model.embedding_backend.*language_embedding"):
        load_config(None, ["model.language_embedding=true", "model.embedding_backend=megatron",
                           "data.demo=true"]).validate()
    with pytest.raises(ConfigError, match="model.language_embedding: expected true or false"):
        load_config(None, ["model.language_embedding=3"])
    on = load_config(None, ["model.language_embedding=true"])
    off = load_config(None, [])
    assert on.num_parameters() - off.num_parameters() == on.vocab.num_lang_ids * on.model.hidden_size


def test_reshard_carries_the_table_and_hf_export_refuses(single, tmp_path):
    from megaslm.checkpoint import Checkpoint
    from megaslm.interop.errors import InteropError
    from megaslm.interop.hf import save_hf
    from megaslm.interop.reshard import reshard

    src = os.path.join(single["dir"], "full", "checkpoints", "step00000004")
    tag = reshard(src, str(tmp_path / "canon"), ["parallel.tensor=2"])
    ck = Checkpoint(tag)
    assert ck.state_dict()[LANG].tolist() == single["lang"]["step00000004"]
    assert LANG in ck.optimizer_state()[0]["exp_avg"]
    with pytest.raises(InteropError) as e:
        save_hf(ck.state_dict(), ck.cfg, str(tmp_path / "hf"))
    assert "model.language_embedding=true" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_evals_feed_language_ids(single):
    ev = single["evals"]
    assert ev["missing_ids"] and "language ids" in ev["missing_ids"]
    changed_fr = unchanged_en = 0
    for langs, a, b in zip(ev["languages"], ev["before"], ev["after"]):
        if "fr" in langs:
            assert a != b, langs
            changed_fr += 1
        else:   # the FR row moved: English-only items score exactly as before
            assert a == b, langs
            unchanged_en += 1
    assert changed_fr and unchanged_en
    assert ev["align_before"] != ev["align_after"]  # FR utterances carry their own language


def test_token_languages_of_an_item():
    from evals.benchmarks import encode, token_languages
    from megaslm.config_io import load_config

    v = load_config(None, ["vocab.codebook_size=128"]).vocab
    toks, start = encode(v, [5, 6, 7], [8, 9], add_bos=True)
    assert token_languages(v, toks, start, ["en", "fr"]) == [0, 1, 1, 1, 2, 2]
    assert token_languages(v, toks, start, ["fr"]) == [0, 2, 2, 2, 2, 2]
