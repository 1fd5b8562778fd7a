"""Atomic, resumable checkpoints around DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

Layout of ``<output_dir>/checkpoints``::

    step00000120/                      a complete checkpoint (the tag is the optimizer step)
        mp_rank_00_model_states.pt     DeepSpeed: model (+ lr scheduler) per model-parallel rank
        *_optim_states.pt              DeepSpeed: optimizer (ZeRO partitions)
        trainer_state_rank00000.pt     ours, one per global rank: counters, data position, RNG states
        meta.json                      ours: human-readable counters (tokens per stage / per source)
    latest                             text file: the newest complete tag (moved last)

A save writes everything to ``<tag>.tmp`` (DeepSpeed with ``save_latest=False``), barriers, then rank 0
renames ``<tag>.tmp`` -> ``<tag>`` (atomic on one POSIX filesystem) and only then rewrites ``latest``
(temporary file + ``os.replace``), then prunes to the newest ``keep_last``. A kill at any moment leaves
the previous checkpoint complete and loadable: a ``*.tmp`` directory is never read (and is removed at
the next load or save); a renamed directory is complete even if ``latest`` was not moved yet, and
``newest_complete`` picks it. Multi-node runs need ``output_dir`` on a shared filesystem.

Test-only fault injection (environment variable ``MEGASLM_FAULT``, comma-separated, see ``fault``):
``kill_during_save:STEP`` SIGKILLs rank 0 after the tmp directory of step STEP is fully written and
before the rename.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

TAG_RE = re.compile(r"^step(\d{8})$")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def fault(kind: str, step: int) -> bool:
    """True when ``MEGASLM_FAULT`` plants ``kind`` at optimizer step ``step`` (test hook)."""
    spec = os.environ.get("MEGASLM_FAULT", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, at = item.partition(":")
        if name == kind and at.strip().isdigit() and int(at) == step:
            return True
    return False


def complete_tags(ckpt_dir: str) -> List[Tuple[int, str]]:
    """(step, tag) of every complete checkpoint directory, oldest first (``*.tmp`` never counts)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.exists(os.path.join(ckpt_dir, name, "meta.json")):
            out.append((int(m.group(1)), name))
    return sorted(out)


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


def write_latest(ckpt_dir: str, tag: str) -> None:
    tmp = os.path.join(ckpt_dir, f"{LATEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


def prune(ckpt_dir: str, keep_last: int) -> None:
    for _, tag in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


# ---- RNG states ------------------------------------------------------------------------------
def rng_state() -> Dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    try:
        st["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel seed yet)
        st["tracker"] = None
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st.get("tracker") is not None:
        get_cuda_rng_tracker().set_states(st["tracker"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ---- save / load -----------------------------------------------------------------------------
def save(engine, ckpt_dir: str, step: int, state: Dict, meta: Dict, keep_last: int) -> str:
    """Atomic save of ``engine`` + this rank's ``state`` (collective: every rank calls it)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = tag_for(step)
    final = os.path.join(ckpt_dir, tag)
    tmp_tag = tag + ".tmp"
    tmp = os.path.join(ckpt_dir, tmp_tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"megaslm": meta}, save_latest=False)
    os.makedirs(tmp, exist_ok=True)
    torch.save({**state, "rng": rng_state()}, os.path.join(tmp, f"trainer_state_rank{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        mtmp = os.path.join(tmp, "meta.json.tmp")
        with open(mtmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(mtmp, os.path.join(tmp, "meta.json"))
        if fault("kill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.path.isdir(final):          # re-save of the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def load(engine, ckpt_dir: str, tag: Optional[str] = None) -> Optional[Tuple[str, Dict, Dict]]:
    """Load the newest complete checkpoint (or ``tag``): returns (path, this rank's state, meta) or None."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        remove_partial(ckpt_dir)
    dist.barrier()
    tag = tag or newest_complete(ckpt_dir)
    if tag is None:
        return None
    path = os.path.join(ckpt_dir, tag)
    if not os.path.exists(os.path.join(path, "meta.json")):
        from megaslm.config import ConfigError

        raise ConfigError(f"checkpoint.load: {path} is not a complete megaslm checkpoint (no meta.json)")
    loaded, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
    if loaded is None:
        from megaslm.config import ConfigError

        raise ConfigError(f"checkpoint.load: DeepSpeed could not load {path}")
    rank = dist.get_rank()
    sp = os.path.join(path, f"trainer_state_rank{rank:05d}.pt")
    if not os.path.exists(sp):
        from megaslm.config import ConfigError

        raise ConfigError(f"checkpoint.load: {sp} missing (was the checkpoint written with another world size?)")
    state = torch.load(sp, weights_only=False)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return path, state, meta
