"""The run directory's names and index, torch-free: the only code that spells or parses a checkpoint tag.

Layout of ``<output_dir>/checkpoints``::

    step00000120/                      a complete checkpoint (the tag is the optimizer step, 8 digits)
        mp_rank_00_model_states.pt     DeepSpeed: model (+ lr scheduler) per model-parallel rank
        *_optim_states.pt              DeepSpeed: optimizer (ZeRO partitions)
        trainer_state_rank00000.pt     ours, one per global rank: TrainState + RNG states
        meta.json                      ours: TrainState, the resolved config, a manifest of file sizes;
                                       written last, its presence marks the directory complete
    step00000120.tmp/                  a save in progress (never read; removed at the next load or save)
    step00000120.corrupt-<time>/       a corrupted checkpoint moved aside by a save of the same step
    latest                             text file: the newest complete tag (moved last)

A canonical (layout-free) checkpoint holds ``model.safetensors`` (+ ``optimizer.safetensors``) instead of
the DeepSpeed files (``megaslm.checkpoint.canonical``).

A checkpoint *in a folder* is a ``stepNNNNNNNN`` directory holding a ``meta.json`` (``complete_tags``,
the one scan every listing here builds on); a directory given by path is a checkpoint when it holds
model files (``is_tag_dir``), whatever its name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zlib
from typing import Any, Dict, List, Optional, Tuple

import megaslm.fsutil as fsutil
from megaslm.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file (one line)."""


# ---- names ---------------------------------------------------------------------------------------
TAG_RE = re.compile(r"^step(\d{8})$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STATE_FILE = re.compile(r"^trainer_state_rank(\d{5})\.pt$")
LATEST = "latest"
META = "meta.json"
CANON_MODEL = "model.safetensors"
CANON_OPTIM = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")      # Adam's moments (the canonical optimizer file: ``<moment>/<name>``)
TMP_SUFFIX = ".tmp"


def tag_for(step: int) -> str:
    """The tag of the checkpoint of optimizer step ``step``."""
    return f"step{step:08d}"


def tag_step(name: str) -> Optional[int]:
    """The step a tag names (None: not a tag)."""
    m = TAG_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_step(ckpt: str) -> Optional[int]:
    """The step of a checkpoint directory from its name: its tag, else the digits it ends with (a
    directory of another name given by path), else None."""
    name = os.path.basename(os.path.normpath(ckpt))
    step = tag_step(name)
    if step is not None:
        return step
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def state_file_name(rank: int) -> str:
    """This rank's ``TrainState`` + RNG file inside a tag directory."""
    return f"trainer_state_rank{rank:05d}.pt"


def tmp_dir_of(tag_dir: str) -> str:
    """Where a save of ``tag_dir`` is written before its rename."""
    return os.path.normpath(tag_dir) + TMP_SUFFIX


def set_aside_name(tag_dir: str, when: float) -> str:
    """Where a corrupted checkpoint is moved when a save of the same step needs its name."""
    return f"{os.path.normpath(tag_dir)}.corrupt-{int(when)}"


def one_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


# ---- the TrainState record -----------------------------------------------------------------------
_INT_FIELDS = ("step", "tokens_seen", "stage_index", "stage_step", "steps_skipped")


@dataclasses.dataclass
class TrainState:
    """Where a run is: shared by save, resume and reshard (``meta.json`` and the per-rank state files)."""
    step: int = 0                       # optimizer steps done (skipped ones included)
    tokens_seen: int = 0
    stage_index: int = 0                # data position: stage and step within it (batches are a function of it)
    stage_step: int = 0
    stage_tokens: Dict[str, int] = dataclasses.field(default_factory=dict)
    source_tokens: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    steps_skipped: int = 0

    FIELDS = ("step", "tokens_seen", "stage_index", "stage_step", "stage_tokens", "source_tokens", "steps_skipped")

    @classmethod
    def of(cls, obj) -> "TrainState":
        """From a trainer (or anything with these attributes)."""
        return cls(**{k: _plain(getattr(obj, k)) for k in cls.FIELDS})

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = META) -> "TrainState":
        missing = [k for k in ("step", "tokens_seen", "stage_index", "stage_step") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: train state fields missing: {', '.join(missing)}")
        try:
            return cls(**{k: (int(d[k]) if k in _INT_FIELDS else _plain(d[k])) for k in cls.FIELDS if k in d})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad train state: {one_line(e)}") from None

    def to_dict(self) -> Dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.FIELDS}

    def restore_into(self, trainer) -> None:
        """The one place counters go back into a trainer (resume of either format)."""
        trainer.step, trainer.tokens_seen = self.step, self.tokens_seen
        trainer.stage_index, trainer.stage_step = self.stage_index, self.stage_step
        trainer.stage_tokens.update(self.stage_tokens)
        for k, v in self.source_tokens.items():
            trainer.source_tokens.setdefault(k, {}).update(v)
        trainer.steps_skipped = self.steps_skipped


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


# ---- meta.json, its manifest, latest -------------------------------------------------------------
def read_meta(tag_dir: str) -> Dict[str, Any]:
    path = os.path.join(tag_dir, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not a complete megaslm checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


def write_manifest(tag_dir: str) -> Dict[str, int]:
    """{file name: size} of every file of ``tag_dir`` but ``meta.json`` (recorded in it; checked by ``verify``)."""
    return {n: os.path.getsize(os.path.join(tag_dir, n)) for n in sorted(os.listdir(tag_dir))
            if n != META and not n.startswith(META) and os.path.isfile(os.path.join(tag_dir, n))}


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)   # releases the GIL: verify reads files in parallel threads
    return crc


def record_crc32(tag_dir: str) -> Dict[str, int]:
    """{file name: CRC-32} of the files of ``tag_dir`` that carry no checksum of their own, recorded in
    ``meta.json`` at save (torch's ``.pt`` files are zip archives with a CRC-32 per member already)."""
    return {n: file_crc32(os.path.join(tag_dir, n)) for n in write_manifest(tag_dir) if not n.endswith(".pt")}


def write_json_atomic(path: str, obj: Any) -> None:
    fsutil.atomic_write_json(path, obj, indent=1)


def write_latest(ckpt_dir: str, tag: str) -> None:
    fsutil.atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)


def read_latest(ckpt_dir: str) -> Optional[str]:
    """The tag ``latest`` names (None: no ``latest`` file)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


# ---- listing and resolving -----------------------------------------------------------------------
def complete_tags(ckpt_dir: str) -> List[Tuple[int, str]]:
    """(step, tag) of every tag directory with a ``meta.json``, oldest first (``*.tmp`` and
    ``*.corrupt-*`` never count). Every listing of checkpoints in a folder is built on this."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        step = tag_step(name)
        if step is not None and os.path.exists(os.path.join(ckpt_dir, name, META)):
            out.append((step, name))
    return sorted(out)


def newest_complete(ckpt_dir: str) -> Optional[str]:
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def newest_meta(run_dir: str) -> Optional[Dict[str, Any]]:
    """``meta.json`` of the run's newest complete checkpoint, with ``_path`` its tag directory (None: none)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = newest_complete(ckpt_dir)
    if tag is None:
        return None
    meta = read_meta(os.path.join(ckpt_dir, tag))
    meta["_path"] = os.path.join(ckpt_dir, tag)
    return meta


def is_canonical(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, CANON_MODEL))


def is_tag_dir(path: str) -> bool:
    """``path`` is one checkpoint (it holds model files of either format), whatever its name."""
    return os.path.isdir(path) and (any(MP_FILE.match(f) for f in os.listdir(path)) or is_canonical(path))


def resolve_tag_dir(path: str) -> str:
    """A tag directory from itself, its ``checkpoints/`` parent (via ``latest`` or the newest), or a run dir."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if is_tag_dir(path):
        return path
    named = read_latest(path)
    if named is not None:
        d = os.path.join(path, named)
        if not os.path.isdir(d):
            raise CheckpointError(f"{os.path.join(path, LATEST)}: names tag {named!r} but {d} does not exist")
        return d
    tag = newest_complete(path)
    if tag is not None:
        return os.path.join(path, tag)
    ck = os.path.join(path, "checkpoints")
    if os.path.isdir(ck):
        return resolve_tag_dir(ck)
    raise CheckpointError(f"{path}: no mp_rank_*_model_states.pt and no 'latest' file (not a DeepSpeed checkpoint)")


def list_checkpoints(path: str) -> List[str]:
    """Every checkpoint directory under ``path`` (itself, ``checkpoints/`` or a run dir), oldest first."""
    if is_tag_dir(path):
        return [path]
    for d in (os.path.join(path, "checkpoints"), path):
        tags = complete_tags(d)
        if tags:
            return [os.path.join(d, t) for _, t in tags]
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint or run directory not found")
    raise CheckpointError(f"{path}: no checkpoint found (expected mp_rank_XX_model_states.pt here or under "
                          f"checkpoints/<tag>/)")


# ---- housekeeping (rank 0) -----------------------------------------------------------------------
def remove_partial(ckpt_dir: str) -> None:
    """Delete ``*.tmp`` leftovers of an interrupted save (rank 0 only)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.endswith(TMP_SUFFIX) or name.startswith(LATEST + TMP_SUFFIX):
            path = os.path.join(ckpt_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    for _, tag in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
