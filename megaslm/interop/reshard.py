"""Write checkpoints of a chosen layout: reshard an existing one, or import an HF model as step 0.

Both run *inside the ranks of the target layout* (world size = TP x PP x DP of the new config, e.g.
``deepspeed --num_gpus 4 launchers/convert.py reshard ...``): every rank reads the source offline
(``read_checkpoint``: canonical full tensors), builds ``Trainer(cfg_new)``, copies its shards in and
saves with ``Trainer.save``, so ``Trainer.load`` resumes from the result like from any of its own saves.
The output is a run directory: ``<out>/config.yaml`` + ``<out>/checkpoints/<tag>/``.

What carries over in a reshard: the weights (bit-identical), the step / tokens / stage counters, the
LR-scheduler position (and the current lr), DeepSpeed's global step count. What does not: the Adam
moments. DeepSpeed's ZeRO optimizer partitions are flat buffers tied to the old layout; they are not
resharded here, so the resumed run starts with a fresh optimizer state (moments = 0) at the right lr.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Sequence

import torch

from megaslm.interop.errors import InteropError


def write_checkpoint(cfg, full: Optional[Dict[str, torch.Tensor]], meta: Dict[str, Any], out_dir: str,
                     log=None) -> str:
    """Collective over the new layout's ranks: Trainer(cfg) with ``output_dir=out_dir``, weights from
    ``full`` (None: as built, e.g. from ``model.init_from``), counters and LR-scheduler position from
    ``meta``, then ``Trainer.save`` (``<out_dir>/checkpoints/<tag>``, resumable by ``Trainer.load``).
    The resolved config is written to ``<out_dir>/config.yaml`` and into the tag directory."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import sharding
    from megaslm.train import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.output_dir = out_dir
    trainer = Trainer(cfg, log=log or (lambda *_: None))
    if full is not None:
        try:
            sharding.load_full_state_dict(trainer.chunks, cfg, full, strict=True)
        except (KeyError, ValueError) as e:
            raise InteropError(f"checkpoint does not fit the new layout: {e}") from None
    for k in ("step", "tokens_seen", "stage_index", "stage_step", "steps_skipped"):
        if meta.get(k) is not None and hasattr(trainer, k):
            setattr(trainer, k, int(meta[k]))
    for k in ("stage_tokens", "source_tokens"):
        if isinstance(meta.get(k), dict) and isinstance(getattr(trainer, k, None), dict):
            getattr(trainer, k).update(copy.deepcopy(meta[k]))
    sched = meta.get("lr_scheduler")
    if sched:
        trainer.scheduler.load_state_dict(sched)
        for g, lr in zip(trainer.scheduler.optimizer.param_groups, trainer.scheduler.get_last_lr()):
            g["lr"] = lr
    if meta.get("global_steps") is not None:
        trainer.engine.global_steps = int(meta["global_steps"])
        trainer.engine.global_samples = int(meta.get("global_samples") or 0)
    saved = copy.deepcopy(cfg)
    saved.model.init_from = None  # the weights are in the checkpoint now
    if dist.get_rank() == 0:
        saved.save(os.path.join(out_dir, "config.yaml"))
    path = trainer.save()
    if dist.get_rank() == 0:
        saved.save(os.path.join(path, "config.yaml"))
    dist.barrier()
    ps.destroy_model_parallel()
    del trainer
    return path


_LAYOUT_KEYS = ("parallel.", "schedule.micro_batch_size", "schedule.global_batch_size", "output_dir",
                "checkpoint.", "logging.")


def resharded_config(src_cfg, overrides: Sequence[str]):
    """The source run's config with layout overrides (``parallel.tensor=1`` ...); the model must not change."""
    from megaslm.config import ConfigError, apply_override, config_from_dict

    tree = copy.deepcopy(src_cfg.to_dict())
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(_LAYOUT_KEYS):
            raise InteropError(f"override {key}: reshard changes the layout only (parallel.*, batch sizes, "
                               f"output_dir, checkpoint.*, logging.*)")
        try:
            apply_override(tree, item)
        except ConfigError as e:
            raise InteropError(str(e)) from None
    tree["model"]["init_from"] = None
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise InteropError(str(e)) from None


def reshard(src: str, out_dir: str, overrides: Sequence[str], config=None, log=None) -> str:
    """Collective over the new layout's ranks: ``src`` (any layout) -> ``<out_dir>/checkpoints/<tag>`` in
    the layout given by ``overrides`` (``parallel.tensor=1`` ...). Returns the new tag directory."""
    from megaslm.interop.checkpoint import read_checkpoint

    src_cfg, full, meta = read_checkpoint(src, config)
    cfg = resharded_config(src_cfg, overrides)
    return write_checkpoint(cfg, full, meta, out_dir, log=log)


def import_hf(cfg, out_dir: str, log=None) -> str:
    """Collective over ``cfg``'s ranks: a step-0 checkpoint whose weights come from ``cfg.model.init_from``."""
    if not cfg.model.init_from:
        raise InteropError("model.init_from: expected a Hugging Face model directory, got None")
    from megaslm.interop.hf import open_hf_dir

    open_hf_dir(cfg.model.init_from, cfg)  # fail before any process group / engine
    return write_checkpoint(cfg, None, {}, out_dir, log=log)
