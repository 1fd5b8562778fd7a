"""The held-out loss (eval.valid): logged at its interval and the last step, leaves training untouched
(bit-identical losses and weights with and without it), and a config that half-sets it is one line."""
import math

import pytest

from _train_helpers import tiny_config
from tests.distributed import run_ranks


def test_valid_loss_does_not_touch_training(tmp_path, corpus):
    stages = [{"name": "en", "train_steps": 5, "data": [{"path": corpus["en"], "weight": 1.0}]}]
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, stages=stages,
                      checkpoint={"interval": 0})
    [res] = run_ranks(1, "tests.train.valid_cases:with_and_without_valid", cfg, str(tmp_path), corpus["fr"],
                      timeout=300)
    w, wo = res["with"], res["without"]
    assert [r["loss"] for r in w] == [r["loss"] for r in wo]       # bit-identical training
    assert res["weights_diff"] == 0.0
    logged = [r["step"] for r in w if r["valid_loss"] is not None]
    assert logged == [3, 5]                                         # every 3 steps and the last step
    assert all(r["valid_loss"] is None for r in wo)
    vals = [r["valid_loss"] for r in w if r["valid_loss"] is not None]
    assert all(math.isfinite(v) and 0 < v < math.log(256) for v in vals)
    assert vals[-1] != vals[0]                                      # measured on the current weights


@pytest.mark.parametrize("over,field", [
    (["eval.valid=[x]"], "eval.valid_interval"),      # the missing half is named
    (["eval.valid_interval=5"], "eval.valid"),
    (["eval.valid=[x]", "eval.valid_interval=5", "eval.valid_sequences=3"], "eval.valid_sequences"),
])
def test_half_set_valid_is_one_line(tmp_path, corpus, over, field):
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config

    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus)
    with pytest.raises(ConfigError) as e:
        load_config(cfg, over).validate(world_size=1)
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
