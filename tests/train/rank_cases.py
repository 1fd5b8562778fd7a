"""Run inside spawned ranks (tests/distributed.py run_ranks) by test_train_ranks.py: several cases per launch."""
from __future__ import annotations

import os
from typing import Dict


def _load(path, overrides=()):
    from megaslm.config_io import load_config

    return load_config(path, list(overrides))


def _model_states(ckpt_dir: str, tag: str) -> Dict:
    import glob

    import torch

    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt_dir, tag, "mp_rank_*_model_states.pt"))):
        out[os.path.basename(f)] = torch.load(f, map_location="cpu", weights_only=False)["module"]
    return out


def same_weights(a: Dict, b: Dict) -> float:
    """Largest absolute difference between two {file: state_dict} (inf if the keys differ)."""
    import torch

    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for f in a:
        if a[f].keys() != b[f].keys():
            return float("inf")
        for k, v in a[f].items():
            if torch.is_tensor(v) and v.is_floating_point():
                worst = max(worst, (v - b[f][k]).abs().max().item() if v.numel() else 0.0)
    return worst


from megaslm.train import Faults  # noqa: E402


class PlantedFaults(Faults):
    """The test's fault injection, handed to the trainer (megaslm.train.Faults): a NaN factor on the
    loss at the steps in ``nan_loss``; a NaN in one gradient entry on rank 0 at the steps in ``nan_grad``."""

    def __init__(self, nan_loss=(), nan_grad=()):
        self.nan_loss, self.nan_grad = set(nan_loss), set(nan_grad)

    def loss_factor(self, step):
        return float("nan") if step in self.nan_loss else None

    def after_backward(self, step, trainer):
        if step in self.nan_grad and trainer.rank == 0:
            for p in trainer.engine.module.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("nan")
                    break


def cases(config_path: str, base_dir: str, valid_prefix: str = "") -> Dict:
    """DP=2 budgets + per-source accounting + TensorBoard; NaN stop; NaN skip (loss and gradient);
    PP=2 in-process resume vs an uninterrupted run."""
    import torch.distributed as dist

    from megaslm import checkpoint, parallel
    from megaslm.run import run
    from megaslm.train import NonFiniteError

    res: Dict = {}
    rank = int(os.environ["RANK"])

    # 1. two stages (partial last step, blended sources) on DP=2
    out = os.path.join(base_dir, "budget")
    valid = [f"eval.valid=[{valid_prefix}]", "eval.valid_interval=4", "eval.valid_sequences=8"] if valid_prefix else []
    hist = run(_load(config_path, [f"output_dir={out}", "logging.tensorboard=true"] + valid), log=lambda *_: None)
    res["budget"] = [{k: r[k] for k in ("step", "stage", "step_tokens", "tokens_seen", "stage_tokens",
                                        "source_tokens", "loss")} for r in hist]
    res["dp_valid"] = [(r["step"], r["valid_loss"]) for r in hist if "valid_loss" in r]
    dist.barrier()
    if rank == 0:
        import json

        tag = checkpoint.newest_complete(os.path.join(out, "checkpoints"))
        with open(os.path.join(out, "checkpoints", tag, "meta.json")) as f:
            res["budget_meta"] = json.load(f)
        res["tb_files"] = os.listdir(os.path.join(out, "tensorboard"))

    # 2. NaN loss at step 3, policy stop (checkpoint every step): error, newest checkpoint stays step 2
    out = os.path.join(base_dir, "nan_stop")
    try:
        run(_load(config_path, [f"output_dir={out}", "checkpoint.interval=1"]), log=lambda *_: None,
            faults=PlantedFaults(nan_loss=[3]))
        res["nan_stop"] = None
    except NonFiniteError as e:
        res["nan_stop"] = str(e)
    dist.barrier()
    res["nan_stop_tags"] = [t for _, t in checkpoint.complete_tags(os.path.join(out, "checkpoints"))]

    # 3. NaN loss at step 3 and a NaN gradient (rank 0 only) at step 5, policy skip
    out = os.path.join(base_dir, "nan_skip")
    hist = run(_load(config_path, [f"output_dir={out}", "checkpoint.interval=1", "checkpoint.keep_last=10",
                                   "faults.nan_policy=skip"]), log=lambda *_: None,
               faults=PlantedFaults(nan_loss=[3], nan_grad=[5]))
    res["nan_skip"] = [{k: r[k] for k in ("step", "loss", "skipped", "tokens_seen")} for r in hist]
    dist.barrier()
    if rank == 0:
        ck = os.path.join(out, "checkpoints")
        res["skip_unchanged"] = [same_weights(_model_states(ck, "step00000002"), _model_states(ck, "step00000003")),
                                 same_weights(_model_states(ck, "step00000004"), _model_states(ck, "step00000005"))]
        res["skip_changed"] = same_weights(_model_states(ck, "step00000003"), _model_states(ck, "step00000004"))
    dist.barrier()

    # 4. PP=2: stop after 3 steps (max_steps), resume in a fresh Trainer, vs uninterrupted
    pp = ["parallel.pipeline=2", "schedule.micro_batch_size=2"]
    full = os.path.join(base_dir, "pp_full")
    h_full = run(_load(config_path, pp + valid + [f"output_dir={full}"]), log=lambda *_: None)
    part = os.path.join(base_dir, "pp_resumed")
    h1 = run(_load(config_path, pp + valid + [f"output_dir={part}", "checkpoint.interval=0"]), log=lambda *_: None,
             max_steps=3)
    h2 = run(_load(config_path, pp + valid + [f"output_dir={part}"]), log=lambda *_: None)
    res["pp_losses"] = ([r["loss"] for r in h_full], [r["loss"] for r in h1 + h2])
    res["pp_valid"] = ([(r["step"], r["valid_loss"]) for r in h_full if "valid_loss" in r],
                       [(r["step"], r["valid_loss"]) for r in h1 + h2 if "valid_loss" in r])
    dist.barrier()
    if rank == 0:
        last = checkpoint.newest_complete(os.path.join(full, "checkpoints"))
        res["pp_tags"] = (last, checkpoint.newest_complete(os.path.join(part, "checkpoints")))
        res["pp_weights_diff"] = same_weights(_model_states(os.path.join(full, "checkpoints"), last),
                                              _model_states(os.path.join(part, "checkpoints"), last))
    parallel.destroy()
    return res
