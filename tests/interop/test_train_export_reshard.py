"""Train from an HF init at TP=2 x PP=2, export to HF (same logits), reshard TP2xPP2 -> TP1 (ZeRO-2) -> TP2xPP2
(identical weights), resume the result with Trainer.load."""
import pytest
import torch

from conftest import TOKENS, hf_logits
from megaslm.checkpoint import read_checkpoint
from megaslm.interop.hf import config_overrides_from_hf, export_hf, read_hf_config
from tests.distributed import run_ranks


@pytest.fixture(scope="module")
def run(llama_dir, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("run"))
    overrides = config_overrides_from_hf(read_hf_config(llama_dir)) + [
        f"model.init_from={llama_dir}", "model.init_new_rows=mean", "vocab.codebook_size=125",
        "model.make_vocab_size_divisible_by=64", "model.seq_length=32", "parallel.tensor=2", "parallel.pipeline=2",
        "parallel.zero_stage=1", "schedule.global_batch_size=8", "schedule.micro_batch_size=4",
        "schedule.warmup_steps=1", "schedule.stages.0.train_steps=10", "optimizer.lr=1e-3"]
    per_rank = run_ranks(4, "interop_workers:train_export_reshard", overrides, work, TOKENS)
    last = per_rank[-1]  # a last-stage rank holds the logits
    for k in ("logits_a", "logits_c"):
        last[k] = torch.from_numpy(last[k])
    last["work"] = work
    return last


def test_export_reload_same_logits(run, tmp_path):
    for ck, name in ((run["path_a"], "tp2pp2-zero1"), (run["path_b"], "tp1-zero2")):
        out = export_hf(ck, str(tmp_path / name))
        ref = hf_logits(out, TOKENS)
        diff = (ref - run["logits_a"]).abs().max().item()
        print(f"export from {name}: max |logit diff| HF vs ours = {diff:.3e}")
        assert ref.shape == run["logits_a"].shape == (2, 12, 128)
        assert diff < 1e-4
    import json

    conf = json.load(open(tmp_path / "tp2pp2-zero1" / "config.json"))
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["vocab_size"] == 128
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (1, 2, 0)
    assert conf["megaslm_vocab"]["codebook_size"] == 125


def test_training_ran_from_hf_init(run):
    assert all(l == l and l > 0 for l in run["losses"])  # finite
    assert run["losses"][1] != run["losses"][0]


def test_reshard_round_trip_identical(run):
    cfg_a, a, meta_a = read_checkpoint(run["path_a"])
    cfg_b, b, meta_b = read_checkpoint(run["path_b"])
    cfg_c, c, meta_c = read_checkpoint(run["path_c"])
    assert (cfg_a.parallel.tensor, cfg_a.parallel.pipeline) == (2, 2)
    assert (cfg_b.parallel.tensor, cfg_b.parallel.pipeline, cfg_b.parallel.zero_stage) == (1, 1, 2)
    assert (cfg_c.parallel.tensor, cfg_c.parallel.pipeline) == (2, 2)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    assert meta_a["step"] == meta_b["step"] == meta_c["step"] == 2


def test_resume_from_resharded(run):
    assert run["loaded"] and run["step_c"] == 2 and run["tokens_c"] == 2 * 8 * 32
    assert torch.equal(run["logits_c"], run["logits_a"])
    assert run["lr_c"] == pytest.approx(run["lr_a"]) and run["opt_lr_c"] == pytest.approx(run["lr_a"])
    assert run["loss_after_resume"] == run["loss_after_resume"]  # trains on (finite)


def test_reshard_keeps_adam_moments(run):
    from megaslm.checkpoint import Checkpoint

    ref, step_a = Checkpoint(run["path_a"]).optimizer_state()
    assert step_a == 2.0 and set(ref) == {"exp_avg", "exp_avg_sq"}
    assert all(v.abs().sum() > 0 for v in ref["exp_avg_sq"].values())
    for path in (run["path_b"], run["path_c"]):
        got, step = Checkpoint(path).optimizer_state()
        assert step == 2.0 and got["exp_avg"].keys() == ref["exp_avg"].keys()
        for kind in ref:
            for k in ref[kind]:
                assert torch.equal(got[kind][k], ref[kind][k]), (path, kind, k)


def test_resharded_resume_trains_like_the_original(run):
    """Same layout after a round trip: bit-identical; TP1 x DP4 (ZeRO-2): the same up to reduction order."""
    assert run["resume_c"] == run["resume_a"]
    assert run["info_b"]["loaded"] and run["info_b"]["step"] == 2
    for got, ref in zip(run["resume_b"], run["resume_a"]):
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_reshard_cli_runs_in_one_process(run, tmp_path, capsys):
    """launchers/convert.py reshard needs no process group or engine; a second write to the same
    place is refused (one line, exit 2), nothing overwritten."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launchers"))
    import convert

    out = str(tmp_path / "tp1")
    args = ["reshard", "--checkpoint", os.path.dirname(run["path_a"]), "--out", out,
            "parallel.tensor=1", "parallel.pipeline=1", "schedule.micro_batch_size=2"]
    assert convert.main(args) == 0
    assert "wrote " in capsys.readouterr().out
    _, full, meta = read_checkpoint(out)
    assert meta["step"] == 2 and meta["format"] == "canonical"
    before = open(os.path.join(out, "checkpoints", "step00000002", "model.safetensors"), "rb").read()
    with pytest.raises(SystemExit) as e:
        convert.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "exists already" in err and "\n" not in err
    assert open(os.path.join(out, "checkpoints", "step00000002", "model.safetensors"), "rb").read() == before
