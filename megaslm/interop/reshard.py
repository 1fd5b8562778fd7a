"""Write layout-free (canonical) checkpoints: reshard an existing one, or import an HF model as step 0.

Neither builds a DeepSpeed engine or optimizer. ``reshard`` reads the source offline in one process
(``megaslm.checkpoint.reader.Checkpoint``: canonical full weights — ZeRO-1/2's fp32 master copies when present —
canonical full Adam moments re-assembled from the ZeRO-0/1/2 optimizer state, the Adam step, the
``TrainState`` and DeepSpeed's step counters) and writes them in the canonical format with the new
layout in its config. ``megaslm.train.Trainer.load`` loads that into the new layout: weights, fp32
master copies and moments are sliced per rank (``megaslm.sharding``), so the resumed run continues
the same optimisation; the lr is recomputed from the schedule at the checkpoint's step.
What does not carry over: per-rank RNG states (another world size has other ranks; with dropout 0
they do not enter the computation). The output is a run directory: ``<out>/config.yaml`` +
``<out>/checkpoints/<tag>/``.
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

from megaslm.checkpoint import CheckpointError, TrainState, tag_for
from megaslm.checkpoint.canonical import write_canonical
from megaslm.checkpoint.reader import Checkpoint
from megaslm.config import ConfigError
from megaslm.config_io import derive_config
from megaslm.interop.errors import InteropError
from megaslm.sharding import EMB

_LAYOUT_KEYS = ("parallel.", "schedule.micro_batch_size", "schedule.global_batch_size", "output_dir",
                "checkpoint.", "logging.")


def resharded_config(src_cfg, overrides: Sequence[str]):
    """The source run's config with layout overrides (``parallel.tensor=1`` ...); the model must not change."""
    def weights_are_in_the_checkpoint(tree, _):
        tree["model"]["init_from"] = None

    try:
        return derive_config(src_cfg, overrides, only=_LAYOUT_KEYS, edit=weights_are_in_the_checkpoint,
                             why="reshard changes the layout only (parallel.*, batch sizes, output_dir, "
                                 "checkpoint.*, logging.*)")
    except ConfigError as e:
        raise InteropError(str(e)) from None


def reshard(src: str, out_dir: str, overrides: Sequence[str], config=None, log=None) -> str:
    """``src`` (any layout, ZeRO-0/1/2, or canonical) -> ``<out_dir>/checkpoints/<tag>`` for the layout
    given by ``overrides``, Adam moments included. One process; returns the new tag directory."""
    ck = Checkpoint(src, config)
    cfg = resharded_config(ck.cfg, overrides)
    cfg.output_dir = out_dir
    moments, adam_step = ck.optimizer_state()
    full = ck.master_state_dict()
    if EMB in full and full[EMB].shape[0] != cfg.padded_vocab_size():
        raise InteropError(f"parallel.tensor={cfg.parallel.tensor}: the padded vocabulary becomes "
                           f"{cfg.padded_vocab_size()} rows but {ck.tag_dir} holds {full[EMB].shape[0]} "
                           f"(choose model.make_vocab_size_divisible_by so both layouts pad alike)")
    counters = ck.engine_counters()
    counters.pop("lr_scheduler", None)  # the lr is a function of (schedule, step): recomputed on load
    return write_canonical(out_dir, cfg, full, moments, adam_step, ck.train_state(), counters)


def import_hf(cfg, out_dir: str, log=None) -> str:
    """A step-0 canonical checkpoint whose weights come from ``cfg.model.init_from`` (the layout-independent
    init for anything HF has no source for). Builds the model at TP=1/PP=1 (no engine, no optimizer);
    collective over the ranks it is started in, rank 0 writes."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.interop.hf import apply_init_from, open_hf_dir
    from megaslm.model import build_model

    if not cfg.model.init_from:
        raise InteropError("model.init_from: expected a Hugging Face model directory, got None")
    open_hf_dir(cfg.model.init_from, cfg)  # fail before any process group / model
    one = copy.deepcopy(cfg)
    one.parallel.tensor, one.parallel.pipeline, one.parallel.virtual_pipeline, one.parallel.data = 1, 1, None, None
    # pad the vocabulary as the target layout does (megatron pads to a multiple of divisor x TP)
    one.model.make_vocab_size_divisible_by = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    parallel.initialize(one)   # one process without a launcher takes a free port, not 29500 (shared nodes)
    chunks = build_model(one)
    apply_init_from(chunks, one)
    full = sharding.gather_full_state_dict(chunks, one)
    saved = copy.deepcopy(cfg)
    saved.output_dir = out_dir
    saved.model.init_from = None  # the weights are in the checkpoint now
    state = TrainState()
    path = os.path.join(out_dir, "checkpoints", tag_for(state.step))
    if dist.get_rank() == 0:
        path = write_canonical(out_dir, saved, full, {}, None, state, {"global_steps": 0, "global_samples": 0})
    dist.barrier()
    ps.destroy_model_parallel()
    return path


__all__ = ["reshard", "import_hf", "resharded_config", "CheckpointError"]
