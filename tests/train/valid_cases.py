"""Run inside a spawned rank (tests/distributed.py run_ranks) by test_valid_loss.py."""
from __future__ import annotations

import os
from typing import Dict


def with_and_without_valid(config_path: str, base_dir: str, valid_prefix: str) -> Dict:
    """The same run with and without a held-out loss: histories and final weights."""
    from megaslm import checkpoint, parallel
    from megaslm.config_io import load_config
    from megaslm.run import run

    from tests.train.rank_cases import _model_states, same_weights

    res: Dict = {}
    valid = [f"eval.valid=[{valid_prefix}]", "eval.valid_interval=3", "eval.valid_sequences=8"]
    runs = {"with": valid, "without": []}
    for name, extra in runs.items():
        out = os.path.join(base_dir, name)
        hist = run(load_config(config_path, [f"output_dir={out}", *extra]), log=lambda *_: None)
        res[name] = [{k: r.get(k) for k in ("step", "loss", "valid_loss")} for r in hist]
        ck = os.path.join(out, "checkpoints")
        res[name + "_weights"] = _model_states(ck, checkpoint.newest_complete(ck))
    res["weights_diff"] = same_weights(res.pop("with_weights"), res.pop("without_weights"))
    parallel.destroy()
    return res
