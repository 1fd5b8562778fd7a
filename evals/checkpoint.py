"""Checkpoints for scoring: a thin user of ``megaslm.ckpt_io`` (the one reader of the DeepSpeed and
canonical layouts) that reports failures as ``EvalError``."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megaslm import ckpt_io
from megaslm.config import RunConfig

from evals.errors import EvalError

checkpoint_step = ckpt_io.checkpoint_step
layer_offset = ckpt_io.layer_offset


def find_checkpoints(path: str) -> List[str]:
    """Checkpoint directories under ``path``: a checkpoint itself, a ``checkpoints/`` folder, or a run directory."""
    try:
        return ckpt_io.list_checkpoints(path)
    except ckpt_io.CheckpointError as e:
        raise EvalError(str(e)) from None


def is_checkpoint(path: str) -> bool:
    try:
        return ckpt_io.list_checkpoints(path) == [path]
    except ckpt_io.CheckpointError:
        return False


def read_config(ckpt: str) -> RunConfig:
    try:
        return ckpt_io.Checkpoint(ckpt).cfg
    except ckpt_io.CheckpointError as e:
        raise EvalError(str(e)) from None


def canonical_full_state_dict(ckpt: str) -> Tuple[RunConfig, Dict[str, torch.Tensor]]:
    """(saved config, canonical full fp32 state dict) of a checkpoint written at any layout."""
    try:
        ck = ckpt_io.Checkpoint(ckpt)
        return ck.cfg, ck.state_dict()
    except ckpt_io.CheckpointError as e:
        raise EvalError(str(e)) from None


__all__ = ["find_checkpoints", "is_checkpoint", "read_config", "canonical_full_state_dict", "checkpoint_step",
           "layer_offset"]
