"""The canonical (layout-free) checkpoint: written without an engine, loaded into any layout.

``<run>/checkpoints/<tag>/`` holds ``model.safetensors`` (full TP=1 fp32 tensors under canonical names),
``optimizer.safetensors`` (``exp_avg/<name>``, ``exp_avg_sq/<name>``), ``config.yaml`` and ``meta.json``
(``TrainState``, config, Adam step, DeepSpeed step counters). ``reshard`` and ``import-hf`` write it;
``megaslm.train.Trainer.load`` loads it into any TP/PP/DP/ZeRO-0/1/2 layout, moments included.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, Optional

import torch

from megaslm import sharding
from megaslm.checkpoint.engine import set_engine_counters, set_optimizer_state
from megaslm.checkpoint.layout import (CANON_MODEL, CANON_OPTIM, META, CheckpointError, TrainState, one_line,
                                       record_crc32, tag_for, tmp_dir_of, write_json_atomic, write_latest,
                                       write_manifest)
from megaslm.checkpoint.reader import Checkpoint
from megaslm.config import RunConfig, config_digest


def write_canonical(out_dir: str, cfg: RunConfig, full: Dict[str, torch.Tensor],
                    moments: Dict[str, Dict[str, torch.Tensor]], adam_step: Optional[float], state: TrainState,
                    counters: Dict[str, Any]) -> str:
    """``<out_dir>/checkpoints/<tag>/`` (+ ``<out_dir>/config.yaml``) in the canonical format, atomically
    (written as ``<tag>.tmp`` then renamed; ``latest`` moved last). One process, no process group."""
    from safetensors.torch import save_file

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    tag = tag_for(state.step)
    final = os.path.join(ckpt_dir, tag)
    tmp = tmp_dir_of(final)
    if os.path.exists(final):
        raise CheckpointError(f"{final}: exists already (not overwritten); choose another --out")
    os.makedirs(ckpt_dir, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(tmp, CANON_MODEL), metadata={"format": "pt"})
    if moments:
        flat = {f"{kind}/{k}": v.contiguous() for kind, d in moments.items() for k, v in d.items()}
        save_file(flat, os.path.join(tmp, CANON_OPTIM), metadata={"format": "pt"})
    cfg.save(os.path.join(tmp, "config.yaml"))
    meta = {**state.to_dict(), "tag": tag, "format": "canonical", "config": cfg.to_dict(),
            "config_digest": config_digest(cfg), "adam_step": adam_step, "time": time.time(),
            **{k: v for k, v in counters.items()}}
    meta["files"], meta["crc32"] = write_manifest(tmp), record_crc32(tmp)
    write_json_atomic(os.path.join(tmp, META), meta)
    os.rename(tmp, final)
    write_latest(ckpt_dir, tag)
    cfg.save(os.path.join(out_dir, "config.yaml"))
    return final


@torch.no_grad()
def load_canonical_into(trainer, tag_dir: str) -> TrainState:
    """Weights, Adam moments (+ step), DeepSpeed counters of a canonical checkpoint into a built trainer
    of any layout; returns its TrainState. RNG states are not carried (another world size has other ranks)."""
    ck = Checkpoint(tag_dir, trainer.cfg)
    full = ck.state_dict()
    moments, adam_step = ck.optimizer_state()
    try:
        sharding.load_full_state_dict(trainer.chunks, trainer.cfg, full, strict=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{tag_dir}: does not fit the model: {one_line(e)}") from None
    set_optimizer_state(trainer.engine, trainer.chunks, trainer.cfg, full, moments, adam_step)
    set_engine_counters(trainer.engine, ck.engine_counters())
    return ck.train_state()
