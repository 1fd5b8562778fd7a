"""Fast, single-process checks: recipes and budgets, config include, token-budget rule, dry run,
checkpoint directory logic, telemetry (no process group needed)."""
import glob
import json
import os

import pytest

from _train_helpers import ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*", "*.yaml")))
TOKENS_PER_STEP = 614_400
B = 1_000_000_000
# the paper's budgets (PAPER.md; see the recipe headers for how the stages are read)
EXPECTED = {
    "en_only": {"en_only": 75_000},
    "fr_only": {"fr_only": 25_000},
    "en_fr": {"en_fr": 100_000},
    "interleaving": {"en_only": 75_000, "interleaving": 10_000},
    "interleaving_ft": {"en_only": 75_000, "interleaving": 10_000, "ft_en_1": 3_750, "ft_fr_1": 3_750,
                        "ft_en_2": 3_750, "ft_fr_2": 3_750},
}
TOTAL_TOKENS = {"en_only": 46.08 * B, "fr_only": 15.36 * B, "en_fr": 61.44 * B, "interleaving": 52.224 * B,
                "interleaving_ft": 61.44 * B}


def test_every_recipe_has_the_paper_hyperparameters_and_exact_budgets():
    from megaslm.config_io import load_config
    from megaslm.data import stage_plans

    assert len(RECIPES) == 20, RECIPES   # 5 recipes x qwen2-360m, llama3.2-1b, llama3.2-3b, llama3.1-8b
    for path in RECIPES:
        model, kind = path.split(os.sep)[-2], os.path.basename(path)[:-5]
        cfg = load_config(path).validate(world_size=4)
        assert cfg.name == f"{model}-{kind}"
        assert cfg.tokens_per_step == TOKENS_PER_STEP and cfg.model.seq_length == 2048
        o, s = cfg.optimizer, cfg.schedule
        assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.clip_grad) == (5e-4, 0.9, 0.98, 0.1, 1.0)
        assert (s.warmup_fraction, s.decay) == (0.05, "linear")
        plans = stage_plans(cfg)
        assert {p.name: p.steps for p in plans} == EXPECTED[kind], path
        for p in plans:  # whole steps: no partial last step in any recipe
            assert p.steps * TOKENS_PER_STEP == p.tokens and p.last_step_tokens == TOKENS_PER_STEP
        assert sum(p.tokens for p in plans) == round(TOTAL_TOKENS[kind])
    en_fr = load_config(os.path.join(ROOT, "configs", "recipes", "llama3.2-1b", "en_fr.yaml"))
    fr_w = [d.weight for d in en_fr.schedule.stages[0].data if d.path == "data/fr"][0]
    assert fr_w * 61.44 == pytest.approx(15.36)
    assert en_fr.model.hidden_size == 2048  # from the base file


def test_base_include_errors_name_the_file(tmp_path):
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config

    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: ../../x\nschedule: {micro_batch_size: 2}\n".replace("../../x", str(tmp_path / "e.yaml")))
    (tmp_path / "e.yaml").write_text("name: e\nschedule: {global_batch_size: 4}\n")
    cfg = load_config(str(tmp_path / "d.yaml"), ["faults.nan_policy=skip"])
    assert (cfg.name, cfg.schedule.micro_batch_size, cfg.schedule.global_batch_size) == ("e", 2, 4)
    assert cfg.faults.nan_policy == "skip"
    with pytest.raises(ConfigError, match="faults.nan_policy"):
        load_config(None, ["faults.nan_policy=maybe", "data.demo=true"]).validate()


def test_partial_last_step_rule():
    from megaslm.config_io import load_config
    from megaslm.data import row_token_counts, stage_plans

    cfg = load_config(None, ["model.seq_length=32", "schedule.global_batch_size=8", "schedule.micro_batch_size=2",
                             "schedule.stages=[{name: a, train_tokens: 868}, {name: b, train_steps: 2}]"])
    a, b = stage_plans(cfg)
    assert (a.steps, a.tokens, a.last_step_tokens) == (4, 868, 100)
    assert [a.step_tokens(i, 256) for i in range(4)] == [256, 256, 256, 100]
    assert (b.steps, b.tokens) == (2, 512)
    assert row_token_counts(100, 8, 32) == [32, 32, 32, 4, 0, 0, 0, 0]
    assert cfg.total_steps() == 6


def test_dry_run_prints_the_layout(capsys):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    import pretrain

    rc = pretrain.main(["--config", os.path.join(ROOT, "configs", "recipes", "qwen2-360m", "interleaving_ft.yaml"),
                        "--dry-run", "--world-size", "8", "parallel.tensor=2", "parallel.pipeline=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "world size 8 = TP 2 x PP 2 x DP 2" in out
    assert "150 sequences = 10 micro-batches of 15" in out
    assert "stage 1 interleaving: 6,144,000,000 tokens = 10,000 steps" in out
    rows = [l.split() for l in out.splitlines() if l.strip() and l.split()[0].isdigit() and len(l.split()) == 4]
    assert rows[5] == ["5", "1", "1", "0"]  # rank 5: tp 1, pp 1, dp 0
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--dry-run", "--world-size", "3",
                       "parallel.tensor=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "parallel" in err


def test_checkpoint_directory_logic(tmp_path):
    from megaslm import checkpoint as ck

    d = tmp_path / "ck"
    for tag, complete in (("step00000002", True), ("step00000004", True), ("step00000006.tmp", True),
                          ("step00000008", False)):
        (d / tag).mkdir(parents=True)
        if complete:
            (d / tag / "meta.json").write_text("{}")
    ck.write_latest(str(d), "step00000002")   # latest not moved yet after the rename of step 4
    assert ck.newest_complete(str(d)) == "step00000004"
    ck.remove_partial(str(d))
    assert not (d / "step00000006.tmp").exists()
    ck.prune(str(d), 1)
    assert [t for _, t in ck.complete_tags(str(d))] == ["step00000004"]
    assert (d / "latest").read_text() == "step00000002"


def test_telemetry_on_cpu(tmp_path):
    from megaslm import telemetry
    from megaslm.config_io import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "llama3.2-1b.yaml"))
    fpt = telemetry.flops_per_token(cfg)
    assert fpt == 6 * cfg.num_parameters() + 12 * 16 * 2048 * 2048
    assert telemetry.peak_flops(None, "bf16") is None and telemetry.peak_flops("cpu", "fp32") is None
    assert telemetry.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    m = telemetry.mfu(cfg, 100_000.0, 4, "NVIDIA H200", "bf16")
    assert m == pytest.approx(fpt * 100_000 / (4 * 989e12))
    assert telemetry.mfu(cfg, 100_000.0, 4, None, "fp32") is None
    gpu = telemetry.GpuMonitor()
    assert not gpu.enabled and gpu.read() == {}
    pytest.importorskip("tensorboard")
    sink = telemetry.MetricsSink(str(tmp_path), jsonl=True, tensorboard=True)
    sink.write({"step": 1, "loss": 2.5, "mfu": None, "source_tokens": {"data/en": 10}})
    sink.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_deepspeed_adapter_names_exist():
    """megaslm/ds_adapter.py patches one engine method and reads one attribute, and the checkpoint code
    reaches optimizer state through the private names it lists: a DeepSpeed release that renames any must
    fail here, not silently log NaN gradient norms or resume without Adam moments."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    from megaslm import ds_adapter

    assert callable(getattr(DeepSpeedEngine, ds_adapter.PATCHED_ENGINE_METHOD))
    assert f"self.{ds_adapter.NORM_ATTRIBUTE}" in inspect.getsource(DeepSpeedEngine.get_global_grad_norm)
    assert "clip_grad_norm_" in inspect.getsource(getattr(DeepSpeedEngine, ds_adapter.PATCHED_ENGINE_METHOD))
    # skip_cpu_shm_op: the op name and the gate build_shm_op consults
    import importlib

    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")   # (deepspeed.comm.torch the attribute is torch)

    src = inspect.getsource(ds_torch.build_shm_op)
    assert "__compatible_ops__" in src and SHM_BUILDER in src
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    assert builder is None or builder.NAME == ds_adapter.SHM_OP
    ds_adapter.skip_cpu_shm_op()
    assert ds_torch.build_shm_op() is None and deepspeed.ops.__compatible_ops__[ds_adapter.SHM_OP] is False
    # checkpoint state into a live engine (megaslm.checkpoint.engine): the Adam-state linkage of ZeRO-1/2 and
    # the bf16 optimizer, the parameter-to-fragment mapping, the scheduler's last lr
    import torch
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import mixed_precision_linkage, safe_set_full_fp32_param

    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        link = getattr(cls, ds_adapter.LINK_METHOD)
        assert callable(link) and f"self.{ds_adapter.LINKED_FLAG}" in inspect.getsource(link), cls
    assert f"lp_param.{ds_adapter.HP_MAPPING} = " in inspect.getsource(mixed_precision_linkage.link_hp_params)
    assert repr(ds_adapter.HP_MAPPING) in inspect.getsource(safe_set_full_fp32_param)
    p = torch.nn.Parameter(torch.zeros(2))
    assert not ds_adapter.holds_partition(p) and not ds_adapter.holds_fragment(p)
    setattr(p, ds_adapter.HP_MAPPING, None)          # a parameter with no fragment on this DP rank
    assert ds_adapter.holds_partition(p) and not ds_adapter.holds_fragment(p)
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=1.0), lambda s: 1.0)
    ds_adapter.set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]


SHM_BUILDER = "ShareMemCommBuilder"


def test_metrics_truncated_to_the_resume_step(tmp_path):
    from megaslm import telemetry

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    lines.insert(4, json.dumps({"step": 4, "eval": {"a": 0.5}}))
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')   # a torn last line (kill mid-write)
    sink = telemetry.MetricsSink(str(tmp_path), jsonl=True, resume_step=3)
    sink.write({"step": 4, "loss": 0.3})
    sink.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] == 0.3
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    # nothing to cut: the file is left as it is (same inode)
    ino = os.stat(path).st_ino
    telemetry.MetricsSink(str(tmp_path), jsonl=True, resume_step=10).close()
    assert os.stat(path).st_ino == ino


def test_production_faults_do_nothing():
    from megaslm.train import Faults

    f = Faults()
    assert all(f.loss_factor(s) is None for s in range(1, 50))
    assert f.after_backward(3, None) is None
    assert f.before_commit(3) is None
