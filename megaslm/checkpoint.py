"""Atomic, resumable checkpoints around DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

Layout of ``<output_dir>/checkpoints`` (formats and reading: ``megaslm.ckpt_io``)::

    step00000120/                      a complete checkpoint (the tag is the optimizer step)
        mp_rank_00_model_states.pt     DeepSpeed: model (+ lr scheduler) per model-parallel rank
        *_optim_states.pt              DeepSpeed: optimizer (ZeRO partitions)
        trainer_state_rank00000.pt     ours, one per global rank: TrainState + RNG states (tensors and
                                       primitives only: loaded with torch.load(weights_only=True))
        meta.json                      ours: TrainState, the resolved config, a manifest of file sizes
    latest                             text file: the newest complete tag (moved last)

A save writes everything to ``<tag>.tmp`` (DeepSpeed with ``save_latest=False``), barriers, then rank 0
writes ``meta.json`` (with the sizes of every file), renames ``<tag>.tmp`` -> ``<tag>`` (atomic on one
POSIX filesystem) and only then rewrites ``latest`` (temporary file + ``os.replace``), then prunes to the
newest ``keep_last``. A kill at any moment leaves the previous checkpoint complete and loadable: a
``*.tmp`` directory is never read (and is removed at the next load or save); a renamed directory is
complete even if ``latest`` was not moved yet. A directory already holding the tag being saved (a
corrupted checkpoint the resume passed over) is moved aside to ``<tag>.corrupt-<time>``, never
overwritten. Which checkpoint a run resumes from (integrity checks, fallback, config check) is
``ckpt_io.select_resume``. Multi-node runs need ``output_dir`` on a shared filesystem.

``save`` takes an optional ``before_commit(step)`` callable, run on rank 0 once the tmp directory is
complete and before the rename: the Trainer passes its injected ``Faults.before_commit`` (a no-op in
production; the crash tests kill the process there).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megaslm.ckpt_io import (LATEST, META, TAG_RE, CheckpointError, TrainState, complete_tags,  # noqa: F401
                             make_engine_loads_safe, read_meta, rng_state, safe_load, set_rng_state, tag_for,
                             write_json_atomic, write_latest, write_manifest)


def newest_complete(ckpt_dir: str) -> Optional[str]:
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def remove_partial(ckpt_dir: str) -> None:
    """Delete ``*.tmp`` leftovers of an interrupted save (rank 0 only)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.endswith(".tmp") or name.startswith(LATEST + ".tmp"):
            path = os.path.join(ckpt_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def prune(ckpt_dir: str, keep_last: int) -> None:
    for _, tag in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"trainer_state_rank{rank:05d}.pt")


# ---- save / load -----------------------------------------------------------------------------
def save(engine, ckpt_dir: str, state: TrainState, meta: Dict[str, Any], keep_last: int,
         before_commit: Optional[Callable[[int], None]] = None) -> str:
    """Atomic save of ``engine`` + this rank's TrainState and RNG (collective: every rank calls it).
    ``before_commit(step)``: called on rank 0 between the complete tmp directory and the rename."""
    import torch.distributed as dist

    rank = dist.get_rank()
    step = state.step
    tag = tag_for(step)
    final = os.path.join(ckpt_dir, tag)
    tmp_tag = tag + ".tmp"
    tmp = os.path.join(ckpt_dir, tmp_tag)
    meta = {**state.to_dict(), **meta, "tag": tag}
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"megaslm": {k: v for k, v in meta.items()
                                                                            if k != "config"}},
                           save_latest=False)
    os.makedirs(tmp, exist_ok=True)
    torch.save({"train_state": state.to_dict(), "rng": rng_state()}, state_file(tmp, rank))
    dist.barrier()
    if rank == 0:
        meta["files"] = write_manifest(tmp)
        write_json_atomic(os.path.join(tmp, META), meta)
        if before_commit is not None:
            before_commit(step)
        if os.path.isdir(final):  # a checkpoint of this step exists (passed over as corrupted): keep it aside
            os.rename(final, f"{final}.corrupt-{int(time.time())}")
        os.rename(tmp, final)
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def load(engine, tag_dir: str) -> Tuple[str, TrainState, Dict[str, Any], Dict[str, Any]]:
    """Load one DeepSpeed-layout checkpoint (chosen and verified by ``ckpt_io.select_resume``) into
    ``engine``, every file through ``safe_load``: (path, TrainState, this rank's RNG states, meta)."""
    import torch.distributed as dist

    ckpt_dir, tag = os.path.dirname(os.path.normpath(tag_dir)), os.path.basename(os.path.normpath(tag_dir))
    meta = read_meta(tag_dir)
    rank = dist.get_rank()
    sp = state_file(tag_dir, rank)
    if not os.path.exists(sp):
        raise CheckpointError(f"{sp}: missing (was the checkpoint written with another world size?)")
    raw = safe_load(sp)
    make_engine_loads_safe(engine)
    loaded, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
    if loaded is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
    if not isinstance(raw, dict) or "rng" not in raw:
        raise CheckpointError(f"{sp}: expected a dict with 'rng' (not a megaslm trainer state)")
    state = TrainState.from_dict(raw.get("train_state", raw), sp)  # older files: counters at the top level
    return tag_dir, state, raw["rng"], meta
