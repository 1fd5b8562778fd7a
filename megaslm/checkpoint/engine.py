"""Saving from and loading into a live DeepSpeed engine: atomic, resumable checkpoints around DeepSpeed's
``save_checkpoint`` / ``load_checkpoint``, per-rank RNG states, and setting optimizer state from
canonical tensors (through ``megaslm.ds_adapter``, the only code that touches DeepSpeed internals).

A save writes everything to ``<tag>.tmp`` (DeepSpeed with ``save_latest=False``), barriers, then rank 0
writes ``meta.json`` (with the sizes of every file), renames ``<tag>.tmp`` -> ``<tag>`` (atomic on one
POSIX filesystem) and only then rewrites ``latest`` (temporary file + ``os.replace``), then prunes to the
newest ``keep_last``. A kill at any moment leaves the previous checkpoint complete and loadable: a
``*.tmp`` directory is never read (and is removed at the next load or save); a renamed directory is
complete even if ``latest`` was not moved yet. A directory already holding the tag being saved (a
corrupted checkpoint the resume passed over) is moved aside to ``<tag>.corrupt-<time>``, never
overwritten. Which checkpoint a run resumes from is ``megaslm.checkpoint.resume.select_resume``.
Multi-node runs need ``output_dir`` on a shared filesystem.

``save`` takes an optional ``before_commit(step)`` callable, run on rank 0 once the tmp directory is
complete and before the rename: the Trainer passes its injected ``Faults.before_commit`` (a no-op in
production; the crash tests kill the process there).
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megaslm import ds_adapter
from megaslm.checkpoint.layout import (META, MOMENTS, CheckpointError, TrainState, newest_complete, prune,
                                       read_meta, record_crc32, set_aside_name, state_file_name, tag_for,
                                       tmp_dir_of, write_json_atomic, write_latest, write_manifest)
from megaslm.checkpoint.safe import make_engine_loads_safe, safe_load


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
    tmp = tmp_dir_of(final)
    meta = {**state.to_dict(), **meta, "tag": tag}
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    dist.barrier()
    try:
        engine.save_checkpoint(ckpt_dir, tag=os.path.basename(tmp),
                               client_state={"megaslm": {k: v for k, v in meta.items() if k != "config"}},
                               save_latest=False)
        os.makedirs(tmp, exist_ok=True)
        torch.save({"train_state": state.to_dict(), "rng": rng_state()}, os.path.join(tmp, state_file_name(rank)))
        dist.barrier()
        if rank == 0:
            meta["files"], meta["crc32"] = write_manifest(tmp), record_crc32(tmp)
            write_json_atomic(os.path.join(tmp, META), meta)
            if before_commit is not None:
                before_commit(step)
            if os.path.isdir(final):  # a checkpoint of this step exists (passed over as corrupted): keep it aside
                os.rename(final, set_aside_name(final, time.time()))
            os.rename(tmp, final)
            write_latest(ckpt_dir, tag)
    except (OSError, RuntimeError) as e:
        raise _save_failed(e, ckpt_dir, tmp, step) from e
    if rank == 0:
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _save_failed(e: BaseException, ckpt_dir: str, tmp: str, step: int) -> BaseException:
    """What a failed save becomes, after removing its partial ``<tag>.tmp`` (whatever the cause: a
    leftover would keep a full disk full and make the resume fail too). A full filesystem (ENOSPC/EDQUOT,
    or torch's writer failing — it reports 'unexpected pos', no errno — with less free space than a
    checkpoint takes) is one line naming the filesystem and the bytes needed; anything else is re-raised
    as it is. Either way the previous checkpoint is untouched: nothing of it is written before the
    rename. In a multi-rank job only the ranks whose writes failed raise; the launcher then stops the
    others (deepspeed's per-node launcher ends the job when one rank exits non-zero)."""
    written = dir_bytes(tmp)
    free = free_bytes(ckpt_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = newest_complete(ckpt_dir)
    need = dir_bytes(os.path.join(ckpt_dir, previous)) if previous else None
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (not isinstance(e, OSError) and free < max(need or 0, written, 64 << 20))
    if not full:
        return e
    mount, fstype = filesystem_of(ckpt_dir)
    need_txt = f"a checkpoint takes {need:,} bytes (as {previous} does)" if need else \
        f"{written:,} bytes were written before it ran out"
    kept = f"the newest checkpoint, {previous}, is intact: free space and rerun to resume from it" if previous \
        else "no earlier checkpoint exists"
    return CheckpointError(f"checkpoint save at step {step}: no space left on {mount} ({fstype}, {free:,} bytes "
                           f"free; {need_txt}); removed the partial {os.path.basename(tmp)}; {kept}")


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def filesystem_of(path: str) -> Tuple[str, str]:
    """(mount point, filesystem type) holding ``path``."""
    mount = os.path.realpath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    fstype = "unknown filesystem"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1] == mount:
                    fstype = parts[2]      # the last entry for a mount point is the one in effect
    except OSError:
        pass
    return mount, fstype


def load(engine, tag_dir: str) -> Tuple[str, TrainState, Dict[str, Any], Dict[str, Any]]:
    """Load one DeepSpeed-layout checkpoint (chosen and verified by ``select_resume``) into ``engine``,
    every file through ``safe_load``: (path, TrainState, this rank's RNG states, meta)."""
    import torch.distributed as dist

    ckpt_dir, tag = os.path.dirname(os.path.normpath(tag_dir)), os.path.basename(os.path.normpath(tag_dir))
    meta = read_meta(tag_dir)
    sp = os.path.join(tag_dir, state_file_name(dist.get_rank()))
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


# ---- RNG states (per rank; tensors and primitives only, so weights_only loading suffices) -------
def rng_state() -> Dict[str, Any]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                    "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    try:
        st["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel seed yet)
        st["tracker"] = None
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(st["python"])
    n = st["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # older trainer states: numpy's own tuple
        np.random.set_state(n)
    torch.set_rng_state(st["torch"])
    if st.get("tracker") is not None:
        get_cuda_rng_tracker().set_states(st["tracker"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ---- canonical state into a live engine ------------------------------------------------------
def set_optimizer_state(engine, chunks, cfg, full: Dict[str, torch.Tensor],
                        moments: Dict[str, Dict[str, torch.Tensor]], adam_step: Optional[float]) -> None:
    """Set fp32 master weights (from ``full``) and the Adam moments of every local parameter shard.

    ZeRO-1/2 (and DeepSpeed's bf16 optimizer) keep both in flat partitions: DeepSpeed's
    ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` write this rank's fragment. Without
    ZeRO the torch optimizer holds per-parameter state: set directly."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megaslm import sharding

    zo = engine.optimizer
    base = getattr(zo, "optimizer", zo)
    step_t = torch.tensor(float(adam_step or 0.0), dtype=torch.float32)
    flats = getattr(zo, "single_partition_of_fp32_groups", None)
    if moments and flats is not None:
        # ZeRO-1/2: torch's Adam creates its state at the first step and DeepSpeed links each parameter's
        # fragment of it only then: create the state now, then let DeepSpeed link it (ds_adapter)
        for flat in flats:
            st = base.state[flat]
            if "exp_avg" not in st:
                st.update(step=step_t.clone(), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if not ds_adapter.can_link_optimizer_state(zo):
            raise CheckpointError(f"DeepSpeed {type(zo).__name__} cannot take Adam moments (no optimizer-state "
                                  f"linkage in this DeepSpeed version)")
        ds_adapter.link_optimizer_state(zo)
    for _, p, spec in sharding.iter_params(chunks, cfg):
        if ds_adapter.holds_partition(p):  # ZeRO / bf16 optimizer (no fragment of it on this DP rank: skip)
            if not ds_adapter.holds_fragment(p):
                continue
            safe_set_full_fp32_param(p, spec.shard(full[spec.canonical]).to(torch.float32))
            for kind in MOMENTS if moments else ():
                safe_set_full_optimizer_state(p, spec.shard(moments[kind][spec.canonical]).to(torch.float32), kind)
        elif moments:
            st = base.state[p]
            for kind in MOMENTS:
                st[kind] = spec.shard(moments[kind][spec.canonical]).to(p.dtype).clone().contiguous()
            st["step"] = step_t.clone()
    if moments and adam_step is not None:
        for st in base.state.values():
            if "step" in st:
                st["step"] = step_t.clone()


def set_engine_counters(engine, counters: Dict[str, Any]) -> None:
    """DeepSpeed's step counters as a checkpoint recorded them (``Checkpoint.engine_counters``)."""
    if counters.get("global_steps") is not None:
        engine.global_steps = int(counters["global_steps"])
        engine.global_samples = int(counters.get("global_samples") or 0)
        engine.skipped_steps = int(counters.get("skipped_steps") or 0)


def sync_master_weights(engine, chunks) -> None:
    """After parameters were changed in place (an HF init), copy them into ZeRO's fp32 master partitions."""
    from deepspeed.utils import safe_set_full_fp32_param

    for c in chunks:
        for p in c.parameters():
            if ds_adapter.holds_fragment(p):
                safe_set_full_fp32_param(p, p.detach().to(torch.float32))


def realign_lr(scheduler, base_lr: float, step: int) -> None:
    """The lr of the next step from the CURRENT schedule at ``step`` (a checkpoint's scheduler and optimizer
    state carry the lr of the run that wrote it, e.g. an ``import-hf`` run's: not the one to use)."""
    scheduler.base_lrs = [base_lr for _ in scheduler.base_lrs]
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(scheduler.optimizer.param_groups, lrs):
        g["lr"] = lr
        g["initial_lr"] = base_lr
    ds_adapter.set_last_lr(scheduler, lrs)
