"""Config: strict YAML, overrides, validation before any process group, presets' sizes."""
import os

import pytest

from megaslm.config import ConfigError
from megaslm.config_io import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("name,target", [("qwen2-360m", 360e6), ("llama3.2-1b", 1.0e9)])
def test_paper_model_sizes(name, target):
    cfg = load_config(os.path.join(CFG, f"{name}.yaml"))
    assert cfg.vocab.codebook_size == 2048
    n = cfg.num_parameters()
    assert abs(n - target) / target <= 0.03, f"{name}: {n:,} parameters, expected within 3% of {target:,.0f}"


def test_parameter_count_matches_built_model(tmp_path):
    """The analytic count is the real one: build the tiny model (TP=1) and count."""
    from tests.distributed import run_ranks

    [n_built] = run_ranks(1, "tests.workers:count_parameters", os.path.join(CFG, "tiny.yaml"))
    assert n_built == load_config(os.path.join(CFG, "tiny.yaml")).num_parameters()


def test_presets_validate():
    for name in ("tiny", "qwen2-360m", "llama3.2-1b"):
        load_config(os.path.join(CFG, f"{name}.yaml")).validate(world_size=1)


def test_overrides_typed_and_nested():
    cfg = load_config(os.path.join(CFG, "tiny.yaml"),
                      ["parallel.tensor=2", "optimizer.lr=1e-3", "schedule.stages.0.train_steps=7", "vocab.dedup=true"])
    assert cfg.parallel.tensor == 2 and cfg.optimizer.lr == 1e-3
    assert cfg.schedule.stages[0].train_steps == 7 and cfg.vocab.dedup is True


@pytest.mark.parametrize("overrides,field", [
    (["model.foo=1"], "model.foo: unknown key"),
    (["parallel.tensor=3"], "parallel.tensor: expected a divisor of model.num_attention_heads=4"),
    (["model.num_layers=3", "parallel.pipeline=2"], "model.num_layers: expected a multiple of"),
    (["model.hidden_size=abc"], "model.hidden_size: expected an integer"),
    (["schedule.global_batch_size=12"], "schedule.global_batch_size"),
    (["parallel.pipeline=2", "parallel.zero_stage=3"], "parallel.zero_stage"),
    (["schedule.decay=exp"], "schedule.decay"),
    (["vocab.languages=[en,en]"], "vocab.languages"),
    (["parallel.pipeline=2", "precision=fp16"], "precision: expected auto, fp32 or bf16 with parallel.pipeline > 1"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(CFG, "tiny.yaml"), overrides).validate(world_size=None)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_world_size_must_match_layout():
    cfg = load_config(os.path.join(CFG, "tiny.yaml"), ["parallel.tensor=2", "parallel.data=2"])
    cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match=r"parallel: expected world size 3 = tensor\(2\) x pipeline\(1\) x data\(2\)"):
        cfg.validate(world_size=3)


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  num_layers: 2\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hiden_size: unknown key"):
        load_config(str(p))


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  num_layers: [2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(p))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(CFG, "tiny.yaml"), ["optimizer.lr=0.002"])
    out = tmp_path / "run" / "config.yaml"
    cfg.save(str(out))
    again = load_config(str(out))
    assert again.to_dict() == cfg.to_dict()
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; import megaslm.config, megaslm.config_io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_duplicate_yaml_keys_are_refused_naming_file_line_and_key(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: a\noptimizer:\n  lr: 1.0e-3\n  beta1: 0.9\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert str(p) in msg and ":5:" in msg and "duplicate key 'lr'" in msg and "line 3" in msg, msg
    assert "\n" not in msg
    q = tmp_path / "top.yaml"
    q.write_text("name: a\nseed: 1\nname: b\n")
    with pytest.raises(ConfigError, match=r"top.yaml:3: .*duplicate key 'name'"):
        load_config(str(q))


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan", "1e400"])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected a finite number"):
        load_config(None, [f"optimizer.lr={value}"])
    with pytest.raises(ConfigError, match=r"optimizer.clip_grad: expected a finite number"):
        load_config(None, [f"optimizer.clip_grad={value}"])


def test_non_finite_float_in_a_file_is_refused(tmp_path):
    p = tmp_path / "inf.yaml"
    p.write_text("optimizer:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"inf.yaml: optimizer.lr: expected a finite number, got inf"):
        load_config(str(p))


def test_train_tokens_under_one_step_are_refused():
    """A stage budget of less than one step (global_batch_size x seq_length tokens) is refused, naming the field,
    the value and one step's tokens (it trained one partial step; the sweeps refuse it, tests/sweep/test_spec.py);
    one step, and a budget that ends with a partial step, are fine."""
    base = [f"{CFG}/tiny.yaml", ["model.seq_length=32", "schedule.global_batch_size=8", "schedule.micro_batch_size=2"]]

    def stages(tokens):
        return load_config(base[0], base[1] + [f"schedule.stages=[{{name: a, train_steps: 2}}, "
                                                f"{{name: b, train_tokens: {tokens}}}]"])

    for ok in (256, 257, 868):
        stages(ok).validate(world_size=1)
    for bad in (1, 100, 255):
        with pytest.raises(ConfigError) as e:
            stages(bad).validate(world_size=1)
        assert str(e.value) == ("schedule.stages[1].train_tokens: expected at least one step (256 tokens = "
                                f"schedule.global_batch_size x model.seq_length = 8 x 32), got {bad}")
