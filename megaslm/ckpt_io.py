"""The one checkpoint reader of megaslm: safe loading, the ``TrainState`` record, resume selection with
corruption fallback, the config check, and the canonical (layout-free) checkpoint format.

Users: ``megaslm.checkpoint`` (training save / resume), ``megaslm.interop`` (export, reshard),
``evals.checkpoint`` (scoring checkpoints). Every failure is a ``CheckpointError`` (a ``ConfigError``,
so the launchers print it as one line and exit 2) whose message names the file.

Two on-disk formats live under ``<run>/checkpoints/<tag>/`` (``tag = stepNNNNNNNN``):

* **DeepSpeed layout** (what training writes): ``mp_rank_XX_model_states.pt`` per rank of the combined
  TP x PP group (``XX = tp + pp * TP``; ``module`` is the rank's state dict, a ``ModuleList`` of the VPP
  chunks with keys ``<chunk>.<name>`` when PP > 1), ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` per
  DP x MP rank at ZeRO-1/2 (flat partitions of the fp32 master weights and Adam moments, with
  ``param_slice_mappings`` saying where each parameter lies), ``trainer_state_rankNNNNN.pt`` per global
  rank (``TrainState`` + RNG states), ``meta.json`` (``TrainState``, the resolved config and a manifest of
  file sizes; written last, its presence marks the directory complete).
* **Canonical layout** (what ``reshard`` writes; no engine is needed to write it): ``model.safetensors``
  (full TP=1 fp32 tensors under canonical names), ``optimizer.safetensors`` (``exp_avg/<name>``,
  ``exp_avg_sq/<name>``), ``meta.json`` (``TrainState``, config, Adam step, DeepSpeed step counters).
  ``megaslm.train.Trainer.load`` loads it into any TP/PP/DP/ZeRO-0/1/2 layout, moments included.

Rules shared by every reader: the tied output weight (``output_layer.weight`` of the last pipeline stage
when ``model.tie_embeddings``) is the embedding (the first stage's copy is kept); buffers and
``_extra_state`` entries are not parameters and are skipped (the model rebuilds them); TP shards are
joined by ``megaslm.sharding``'s layout table.

Safety (no unpickling of untrusted files): every ``.pt`` is read with ``torch.load(weights_only=True)``
and the allow-list below (DeepSpeed's ZeRO files hold a ``LossScaler`` object, a ``ZeroStageEnum`` and
``fragment_address`` tuples; older trainer states hold numpy RNG arrays); DeepSpeed's own
``load_checkpoint`` is routed through the same function by ``make_engine_loads_safe`` (its
``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``). Before a resume, each file's
pickle is scanned for globals outside the allow-list without executing it; a hit is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megaslm.config import ConfigError, RunConfig, config_digest, config_from_dict, load_config


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file (one line)."""


TAG_RE = re.compile(r"^step(\d{8})$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STATE_FILE = re.compile(r"^trainer_state_rank(\d{5})\.pt$")
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
LATEST = "latest"
META = "meta.json"
CANON_MODEL = "model.safetensors"
CANON_OPTIM = "optimizer.safetensors"
EMB = "embedding.word_embeddings.weight"
MOMENTS = ("exp_avg", "exp_avg_sq")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------------
# safe loading
# ------------------------------------------------------------------------------------------------
def _safe_globals() -> List[Any]:
    """The non-tensor types our checkpoints hold (and nothing that runs code when rebuilt)."""
    import numpy as np

    out: List[Any] = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # reading offline without deepspeed: such files are refused with a clear error
        pass
    # trainer states written before this module (numpy's MT19937 key array)
    out += [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return out


def _allowed_names() -> set:
    return {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()} | {"numpy._core.multiarray._reconstruct",
                                                                            "numpy.core.multiarray._reconstruct"}


def safe_load(path: str, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)`` with the allow-list; a refusal or a bad file is one line."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError, zipfile.BadZipFile,
            OSError) as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {_one_line(e)}") from None


def unsafe_globals(path: str) -> List[str]:
    """Globals the file's pickle would import that are not allow-listed (found WITHOUT unpickling)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    ok = _allowed_names()
    return [g for g in found if g not in ok]


def make_engine_loads_safe(engine) -> None:
    """The one adapter for DeepSpeed's ``load_checkpoint``: its checkpoint engine reads every model,
    optimizer and scheduler file through ``safe_load`` instead of ``torch.load(weights_only=False)``."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        raise CheckpointError("DeepSpeed engine has no checkpoint_engine (an unsupported DeepSpeed version?)")
    ce.load = lambda path, map_location=None: safe_load(path, map_location or "cpu")


# ------------------------------------------------------------------------------------------------
# the TrainState record
# ------------------------------------------------------------------------------------------------
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
    def from_dict(cls, d: Dict[str, Any], where: str = "meta.json") -> "TrainState":
        missing = [k for k in ("step", "tokens_seen", "stage_index", "stage_step") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: train state fields missing: {', '.join(missing)}")
        try:
            return cls(**{k: (int(d[k]) if k in ("step", "tokens_seen", "stage_index", "stage_step", "steps_skipped")
                              else _plain(d[k])) for k in cls.FIELDS if k in d})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad train state: {_one_line(e)}") from None

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


def read_meta(tag_dir: str) -> Dict[str, Any]:
    path = os.path.join(tag_dir, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not a complete megaslm checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


# ------------------------------------------------------------------------------------------------
# which checkpoint to resume: integrity, fallback, config check
# ------------------------------------------------------------------------------------------------
def complete_tags(ckpt_dir: str) -> List[Tuple[int, str]]:
    """(step, tag) of every directory with a ``meta.json``, oldest first (``*.tmp`` never counts)."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.exists(os.path.join(ckpt_dir, name, META)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def is_canonical(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, CANON_MODEL))


def verify(tag_dir: str, world_size: Optional[int] = None) -> Optional[str]:
    """None when ``tag_dir`` looks complete and intact; else what is wrong (a corruption, one line).

    Cheap: sizes against the manifest in ``meta.json``, each torch file's zip directory, the expected
    set of files for the layout. A pickle that imports anything outside the allow-list is not a
    corruption but an attack or a foreign file: it raises ``CheckpointError`` (never falls back)."""
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as e:
        return str(e)
    names = sorted(os.listdir(tag_dir))
    # the security scan first: a planted pickle is refused even where it also breaks the manifest
    for n in names:
        if not n.endswith(".pt"):
            continue
        p = os.path.join(tag_dir, n)
        try:
            with zipfile.ZipFile(p) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{p}: not a readable torch file ({_one_line(e)})"
        try:
            bad = unsafe_globals(p)
        except Exception as e:  # noqa: BLE001 - a pickle that cannot even be scanned is corrupt
            return f"{p}: unreadable pickle ({_one_line(e)})"
        if bad:
            raise CheckpointError(f"{p}: refused: its pickle imports {', '.join(bad[:3])} (not an allow-listed "
                                  f"type; nothing was loaded)")
    manifest = meta.get("files") or {}
    for name, size in manifest.items():
        p = os.path.join(tag_dir, name)
        if not os.path.exists(p):
            return f"{p}: missing (listed in {META})"
        if os.path.getsize(p) != size:
            return f"{p}: {os.path.getsize(p)} bytes, {META} recorded {size} (truncated or overwritten)"
    if is_canonical(tag_dir):
        for fname in (CANON_MODEL, CANON_OPTIM):
            p = os.path.join(tag_dir, fname)
            if os.path.exists(p):
                try:
                    from safetensors import safe_open

                    with safe_open(p, framework="pt") as h:
                        list(h.keys())
                except Exception as e:  # noqa: BLE001 - any header failure means the file is unusable
                    return f"{p}: not a readable safetensors file ({_one_line(e)})"
        return None
    mp = sorted(int(m.group(1)) for n in names if (m := MP_FILE.match(n)))
    if not mp:
        return f"{tag_dir}: no mp_rank_XX_model_states.pt"
    if mp != list(range(len(mp))):
        return f"{tag_dir}: model-state files for mp ranks {mp} (a shard is missing)"
    if world_size is not None:
        states = [n for n in names if STATE_FILE.match(n)]
        if len(states) != world_size:
            want = [f"trainer_state_rank{r:05d}.pt" for r in range(world_size)]
            miss = [w for w in want if w not in states]
            detail = f"{miss[0]} missing" if miss else f"{len(states)} trainer_state files"
            if manifest:  # every file the save wrote is there: a world-size change, not a corruption
                raise CheckpointError(f"{tag_dir}: written by {len(states)} ranks, this run has {world_size} "
                                      f"({detail}): change the layout with launchers/convert.py reshard")
            return f"{tag_dir}: {len(states)} trainer_state files for a world of {world_size} ({detail})"
    return None


@dataclasses.dataclass
class Resume:
    tag_dir: str
    meta: Dict[str, Any]
    skipped: List[str]          # newer checkpoints passed over as corrupted


# Fields that do not change what a run computes; every other field is compared on resume.
_FREE = ("name", "output_dir", "checkpoint.", "logging.", "faults.", "eval.", "schedule.micro_batch_size",
         "data.cache_dir", "data.demo_stories", "parallel.cpu_threads", "model.init_from", "model.init_new_rows",
         "model.attention_backend", "model.embedding_backend", "model.deterministic", "model.recompute",
         "model.recompute_method", "model.recompute_num_layers", "model.recompute_modules",
         "parallel.sequence_parallel")


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {f"{prefix}len": len(tree)}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: Dict[str, Any], cfg: RunConfig, layout_free: bool = False) -> List[str]:
    """Run-changing fields that differ between a checkpoint's config and ``cfg`` (``a.b: old -> new``)."""
    a, b = _flatten(saved), _flatten(cfg.to_dict())
    free = _FREE + (("parallel.",) if layout_free else ())
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(free) or k in free:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def select_resume(cfg: RunConfig, world_size: int, allow_config_change: bool = False,
                  warn: Callable[[str], None] = print, directory: Optional[str] = None) -> Optional[Resume]:
    """The checkpoint a run resumes from (None: start from scratch), chosen before any model is built.

    ``checkpoint.load`` naming one tag directory: that one, intact, or an error. Otherwise the newest
    intact checkpoint of the directory: corrupted newer ones are passed over with a warning naming both
    (and left as they are); if checkpoints exist but none is intact, an error (never a silent restart).
    A config whose run-changing fields differ from the checkpoint's is refused unless
    ``allow_config_change``."""
    explicit = directory or cfg.checkpoint.load
    d = os.path.normpath(explicit or os.path.join(cfg.output_dir, "checkpoints"))
    say = warn if _is_rank0() else (lambda *_: None)
    if TAG_RE.match(os.path.basename(d)) or is_canonical(d) or os.path.exists(os.path.join(d, META)):
        if not os.path.isdir(d):
            raise CheckpointError(f"checkpoint.load: {d} not found")
        problem = verify(d, None if is_canonical(d) else world_size)
        if problem:
            raise CheckpointError(f"checkpoint.load: {problem}")
        chosen = Resume(d, read_meta(d), [])
    else:
        if explicit and not os.path.isdir(d):
            raise CheckpointError(f"checkpoint.load: {d} not found")
        latest = os.path.join(d, LATEST)
        if os.path.exists(latest):
            with open(latest) as f:
                named = f.read().strip()
            if not os.path.isdir(os.path.join(d, named)):
                say(f"warning: {latest} names {named!r} but {os.path.join(d, named)} does not exist; "
                    f"looking for the newest complete checkpoint instead")
        chosen, skipped, problems = None, [], []
        for _, tag in reversed(complete_tags(d)):
            tdir = os.path.join(d, tag)
            problem = verify(tdir, None if is_canonical(tdir) else world_size)
            if problem is None:
                chosen = Resume(tdir, read_meta(tdir), skipped)
                break
            skipped.append(tdir)
            problems.append(problem)
            say(f"warning: checkpoint {tdir} is corrupted ({problem}); trying an older one")
        if chosen is None:
            if skipped:
                raise CheckpointError(f"{d}: no intact checkpoint to resume from ({len(skipped)} corrupted; newest: "
                                      f"{problems[0]}); refusing to restart from scratch over them — move them "
                                      f"away to start afresh")
            return None
        if skipped:
            say(f"warning: resuming from {chosen.tag_dir} instead of the corrupted {skipped[0]} (left as it is)")
    saved = chosen.meta.get("config")
    if isinstance(saved, dict):
        changes = config_changes(saved, cfg, layout_free=is_canonical(chosen.tag_dir))
        if int(chosen.meta.get("step", -1)) == 0:
            # a step-0 checkpoint (an HF import) is an initialisation: only what shapes the weights must match
            changes = [c for c in changes if c.startswith(("model.", "vocab."))]
        if changes and not allow_config_change:
            hint = " — a layout change needs launchers/convert.py reshard" if any(
                c.startswith("parallel.") for c in changes) else ""
            raise CheckpointError(f"{chosen.tag_dir}: the config differs from the checkpoint's in "
                                  f"{'; '.join(changes)} (pass --allow-config-change to resume anyway{hint})")
        if changes:
            say(f"warning: resuming {chosen.tag_dir} with a changed config ({'; '.join(changes)})")
    elif chosen.meta.get("config_digest") and chosen.meta["config_digest"] != config_digest(cfg) \
            and not allow_config_change and not explicit:
        raise CheckpointError(f"{chosen.tag_dir}: the config digest differs from the checkpoint's "
                              f"({config_digest(cfg)} vs {chosen.meta['config_digest']}; this checkpoint does not "
                              f"record which fields) — pass --allow-config-change to resume anyway")
    return chosen


def write_manifest(tag_dir: str) -> Dict[str, int]:
    return {n: os.path.getsize(os.path.join(tag_dir, n)) for n in sorted(os.listdir(tag_dir))
            if n != META and not n.startswith(META) and os.path.isfile(os.path.join(tag_dir, n))}


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_latest(ckpt_dir: str, tag: str) -> None:
    tmp = os.path.join(ckpt_dir, f"{LATEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


# ------------------------------------------------------------------------------------------------
# reading any checkpoint offline: config, canonical weights, canonical Adam moments, train state
# ------------------------------------------------------------------------------------------------
def resolve_tag_dir(path: str) -> str:
    """A tag directory from itself, its ``checkpoints/`` parent (via ``latest`` or the newest), or a run dir."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    names = os.listdir(path)
    if any(MP_FILE.match(f) for f in names) or CANON_MODEL in names:
        return path
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            tag = f.read().strip()
        d = os.path.join(path, tag)
        if not os.path.isdir(d):
            raise CheckpointError(f"{latest}: names tag {tag!r} but {d} does not exist")
        return d
    tags = complete_tags(path)
    if tags:
        return os.path.join(path, tags[-1][1])
    ck = os.path.join(path, "checkpoints")
    if os.path.isdir(ck):
        return resolve_tag_dir(ck)
    raise CheckpointError(f"{path}: no mp_rank_*_model_states.pt and no 'latest' file (not a DeepSpeed checkpoint)")


def list_checkpoints(path: str) -> List[str]:
    """Every checkpoint directory under ``path`` (itself, ``checkpoints/`` or a run dir), oldest first."""
    if os.path.isdir(path) and (any(MP_FILE.match(f) for f in os.listdir(path)) or is_canonical(path)):
        return [path]
    for d in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(d):
            tags = [t for t in os.listdir(d) if os.path.isdir(os.path.join(d, t)) and not _set_aside(t)
                    and (any(MP_FILE.match(f) for f in os.listdir(os.path.join(d, t))) or is_canonical(os.path.join(d, t)))]
            if tags:
                return [os.path.join(d, t) for t in sorted(tags, key=_step_key)]
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint or run directory not found")
    raise CheckpointError(f"{path}: no checkpoint found (expected mp_rank_XX_model_states.pt here or under "
                          f"checkpoints/<tag>/)")


def _set_aside(name: str) -> bool:
    """An interrupted save (``<tag>.tmp``) or a corrupted checkpoint moved aside (``<tag>.corrupt-<time>``)."""
    return name.endswith(".tmp") or ".corrupt-" in name


def _step_key(tag: str):
    m = re.search(r"(\d+)$", tag)
    return (int(m.group(1)) if m else -1, tag)


def checkpoint_step(ckpt: str) -> Optional[int]:
    m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None


def layer_offset(cfg: RunConfig, pp_rank: int, vp_stage: int) -> int:
    """Global index of a chunk's first layer (megatron's uniform split, VPP-aware)."""
    L, P, V = cfg.model.num_layers, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline or 1
    per = L // (P * V)
    return vp_stage * (L // V) + pp_rank * per


class Checkpoint:
    """One checkpoint directory of either format, read offline in one process (no engine, no process
    group). ``config`` (a RunConfig or a YAML path) is needed only when none is saved with it."""

    def __init__(self, path: str, config=None):
        self.tag_dir = resolve_tag_dir(path)
        self.canonical = is_canonical(self.tag_dir)
        self.meta: Dict[str, Any] = read_meta(self.tag_dir) if os.path.exists(os.path.join(self.tag_dir, META)) else {}
        self._files: Dict[str, Any] = {}
        if self.canonical:
            self.mp_files: List[Tuple[int, str]] = []
            self.first: Dict[str, Any] = {}
        else:
            self.mp_files = sorted((int(m.group(1)), f) for f in os.listdir(self.tag_dir) if (m := MP_FILE.match(f)))
            self.first = self._load(self.mp_files[0][1])
        self.cfg = self._find_config(config)
        self._check_layout()

    # ---- files ---------------------------------------------------------------------------
    def _load(self, fname: str) -> Dict[str, Any]:
        if fname not in self._files:
            sd = safe_load(os.path.join(self.tag_dir, fname))
            if not isinstance(sd, dict):
                raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: expected a dict, got {type(sd).__name__}")
            self._files[fname] = sd
        return self._files[fname]

    def _find_config(self, config) -> RunConfig:
        try:
            if isinstance(config, RunConfig):
                return config
            if isinstance(config, str):
                return load_config(config)
            client = self.first.get("megaslm") if isinstance(self.first.get("megaslm"), dict) else {}
            for tree in (self.meta.get("config"), self.first.get("config"), client.get("config")):
                if isinstance(tree, dict):
                    return config_from_dict(tree)
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(self.tag_dir)))
            for cand in (os.path.join(self.tag_dir, "config.yaml"), os.path.join(run_dir, "config.yaml")):
                if os.path.exists(cand):
                    cfg = load_config(cand)
                    digest = self.meta.get("config_digest") or client.get("config_digest")
                    if digest and cand.startswith(run_dir) and config_digest(cfg) != digest and \
                            not os.path.exists(os.path.join(self.tag_dir, "config.yaml")):
                        raise CheckpointError(f"{cand}: does not match the checkpoint {self.tag_dir} (digest "
                                              f"{config_digest(cfg)} vs recorded {digest}): the run's config "
                                              f"changed after this save; pass the config it was saved with")
                    return cfg
        except CheckpointError:
            raise
        except ConfigError as e:
            raise CheckpointError(f"{self.tag_dir}: run config: {e}") from None
        raise CheckpointError(f"{self.tag_dir}: no run config found (neither {self.tag_dir}/config.yaml nor the run "
                              f"directory's config.yaml): pass --config")

    def _check_layout(self) -> None:
        if self.canonical:
            return
        cfg, first = self.cfg, self.first
        zero = (first.get("ds_config") or {}).get("zero_optimization", {}).get("stage", cfg.parallel.zero_stage)
        self.zero_stage = int(zero)
        if self.zero_stage == 3:
            raise CheckpointError(f"{self.tag_dir}: ZeRO-3 checkpoints are not supported (parameters live in the "
                                  f"optimizer partitions; consolidate with DeepSpeed's zero_to_fp32.py first)")
        dims = first.get("checkpoint_parallel_dimensions") or {}
        for key, fld in (("tp_degree", "tensor"), ("pp_degree", "pipeline")):
            if key in dims and int(dims[key]) != getattr(cfg.parallel, fld):
                raise CheckpointError(f"parallel.{fld}: the config says {getattr(cfg.parallel, fld)} but "
                                      f"{self.tag_dir} was written with {dims[key]}")
        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        want = list(range(tp * pp))
        if [r for r, _ in self.mp_files] != want:
            raise CheckpointError(f"{self.tag_dir}: expected model-state files for mp ranks {want} (TP={tp} x PP={pp}), "
                                  f"found {[r for r, _ in self.mp_files]}")

    # ---- names ---------------------------------------------------------------------------
    def _canonical(self, key: str, p_rank: int) -> Optional[str]:
        """Canonical name of a rank-local key; None for buffers / extra state / the tied copy."""
        cfg = self.cfg
        if key.endswith("_extra_state"):
            return None
        vp, name = 0, key
        if cfg.parallel.pipeline > 1 or cfg.parallel.virtual_pipeline:
            head, _, rest = key.partition(".")
            if not head.isdigit():
                raise CheckpointError(f"{self.tag_dir}: unexpected key {key!r} for a pipeline checkpoint")
            vp, name = int(head), rest
        m = LAYER.match(name)
        if m:
            return f"decoder.layers.{layer_offset(cfg, p_rank, vp) + int(m.group(1))}.{m.group(2)}"
        if name == "output_layer.weight" and cfg.model.tie_embeddings:
            return EMB  # the last stage's copy of the tied embedding (the first stage's is kept)
        return name

    def _join(self, shards: Dict[str, List[Optional[torch.Tensor]]], what: str) -> Dict[str, torch.Tensor]:
        from megaslm.sharding import ParamSpec, split_rule

        tp = self.cfg.parallel.tensor
        full: Dict[str, torch.Tensor] = {}
        for canon, parts in shards.items():
            dim, glu = split_rule(canon)
            if dim < 0:
                full[canon] = next(p for p in parts if p is not None)
                continue
            if any(p is None for p in parts):
                raise CheckpointError(f"{self.tag_dir}: {what} {canon!r}: shards missing for TP ranks "
                                      f"{[i for i, p in enumerate(parts) if p is None]}")
            full[canon] = ParamSpec(canon, (), dim, glu, 0, tp).unshard(parts).contiguous()
        return full

    # ---- weights -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Canonical full fp32 weights (the module's tensors as saved)."""
        if self.canonical:
            return self._canonical_file(CANON_MODEL)
        from megaslm.sharding import split_rule

        tp = self.cfg.parallel.tensor
        shards: Dict[str, List[Optional[torch.Tensor]]] = {}
        for mp, fname in self.mp_files:
            sd = self._load(fname)
            module = sd.get("module")
            if not isinstance(module, dict) or not module:
                raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: field 'module' missing")
            t_rank, p_rank = mp % tp, mp // tp
            buffers = set(sd.get("buffer_names") or [])
            for key, val in module.items():
                if not torch.is_tensor(val) or key in buffers:
                    continue  # buffers (e.g. rotary frequencies) are rebuilt by the model
                canon = self._canonical(key, p_rank)
                if canon is None:
                    continue
                try:
                    split_rule(canon)
                except KeyError:
                    raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: tensor {key!r} has no known "
                                          f"tensor-parallel layout (megaslm.sharding.split_rule)") from None
                if val.numel() == 0:
                    raise CheckpointError(f"{fname}: tensor {key!r} is empty (a ZeRO-3 partitioned checkpoint?)")
                slot = shards.setdefault(canon, [None] * tp)
                if slot[t_rank] is None:
                    slot[t_rank] = val.detach().to(torch.float32)
        full = self._join(shards, "tensor")
        if EMB in full and full[EMB].shape[0] != self.cfg.padded_vocab_size():
            raise CheckpointError(f"{self.tag_dir}: tensor {EMB!r} has {full[EMB].shape[0]} rows but the config's "
                                  f"padded vocabulary is {self.cfg.padded_vocab_size()} (vocab / "
                                  f"model.make_vocab_size_divisible_by)")
        return full

    def _canonical_file(self, fname: str) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = os.path.join(self.tag_dir, fname)
        try:
            return load_file(p)
        except FileNotFoundError:
            raise CheckpointError(f"{p}: not found") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({_one_line(e)})") from None

    # ---- Adam moments --------------------------------------------------------------------
    def optimizer_state(self) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Optional[float]]:
        """({"exp_avg": {canon: full}, "exp_avg_sq": {...}}, Adam step) — ({}, None) when the checkpoint
        holds no optimizer state (e.g. an HF import at step 0)."""
        if self.canonical:
            p = os.path.join(self.tag_dir, CANON_OPTIM)
            if not os.path.exists(p):
                return {}, None
            flat = self._canonical_file(CANON_OPTIM)
            out: Dict[str, Dict[str, torch.Tensor]] = {k: {} for k in MOMENTS}
            for key, t in flat.items():
                kind, _, canon = key.partition("/")
                if kind in out:
                    out[kind][canon] = t
            return out, self.meta.get("adam_step")
        if self.zero_stage == 0:
            return self._zero0_moments()
        return self._zero12_moments()

    def _param_names_in_group_order(self, mp: int) -> List[List[str]]:
        """Rank-local parameter names per optimizer group, in the order ``megaslm.train.param_groups``
        passes them (module order; decay = matrices, no-decay = 1-D tensors and biases)."""
        sd = self._load(dict(self.mp_files)[mp])
        buffers = set(sd.get("buffer_names") or [])
        decay, no_decay = [], []
        for key, val in sd["module"].items():
            if key.endswith("_extra_state") or key in buffers or not torch.is_tensor(val):
                continue
            (no_decay if (val.dim() == 1 or key.endswith(".bias")) else decay).append(key)
        return [decay, no_decay] if no_decay else [decay]

    def _zero0_moments(self):
        tp = self.cfg.parallel.tensor
        shards: Dict[str, Dict[str, List[Optional[torch.Tensor]]]] = {k: {} for k in MOMENTS}
        steps = set()
        for mp, fname in self.mp_files:
            opt = self._load(fname).get("optimizer")
            if not isinstance(opt, dict) or "state" not in opt:
                raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: no torch optimizer state (a bf16 run "
                                      f"without ZeRO keeps it in bf16_zero_* files, which this reader does not "
                                      f"re-slice; reshard from a ZeRO-1/2 or fp32 checkpoint)")
            groups = self._param_names_in_group_order(mp)
            if [len(g["params"]) for g in opt["param_groups"]] != [len(g) for g in groups]:
                raise CheckpointError(f"{os.path.join(self.tag_dir, fname)}: optimizer groups hold "
                                      f"{[len(g['params']) for g in opt['param_groups']]} parameters, the module "
                                      f"{[len(g) for g in groups]}")
            module = self._load(fname)["module"]
            for g, names in zip(opt["param_groups"], groups):
                for idx, key in zip(g["params"], names):
                    st = opt["state"].get(idx)
                    if not st:
                        continue
                    if tuple(st["exp_avg"].shape) != tuple(module[key].shape):
                        raise CheckpointError(f"{fname}: optimizer state {idx} has shape {list(st['exp_avg'].shape)} "
                                              f"but parameter {key!r} {list(module[key].shape)}")
                    canon = self._canonical(key, mp // tp)
                    steps.add(float(st["step"]))
                    for kind in MOMENTS:
                        slot = shards[kind].setdefault(canon, [None] * tp)
                        if slot[mp % tp] is None:
                            slot[mp % tp] = st[kind].detach().to(torch.float32)
        return self._finish_moments(shards, steps)

    def _zero12_moments(self):
        tp = self.cfg.parallel.tensor
        names = os.listdir(self.tag_dir)
        files = sorted((int(m.group(2)), int(m.group(1)), n) for n in names if (m := OPTIM_FILE.match(n)))
        if not files:
            raise CheckpointError(f"{self.tag_dir}: ZeRO-{self.zero_stage} checkpoint without *_optim_states.pt files")
        shards: Dict[str, Dict[str, List[Optional[torch.Tensor]]]] = {k: {} for k in MOMENTS + ("fp32",)}
        steps = set()
        for mp, fname in self.mp_files:
            shapes = self._load(fname).get("param_shapes") or []
            per_dp = [n for m_, _, n in files if m_ == mp]
            if not per_dp:
                raise CheckpointError(f"{self.tag_dir}: no optimizer files for mp rank {mp}")
            osds = [self._load(n)["optimizer_state_dict"] for n in per_dp]
            for g, shape_map in enumerate(shapes):
                for key, shape in shape_map.items():
                    canon = self._canonical(key, mp // tp)
                    parts = {k: [] for k in MOMENTS + ("fp32",)}
                    for n, osd in zip(per_dp, osds):
                        addr = osd["param_slice_mappings"][g].get(key)
                        if addr is None:
                            continue
                        st = osd["base_optimizer_state"]["state"].get(g)
                        if not st:  # saved before the first step: Adam has no state yet
                            parts = None
                            break
                        steps.add(float(st["step"]))
                        for kind in MOMENTS:
                            parts[kind].append(st[kind].narrow(0, addr.start, addr.numel))
                        parts["fp32"].append(osd["single_partition_of_fp32_groups"][g].narrow(0, addr.start, addr.numel))
                    if parts is None:
                        return {}, None
                    numel = int(torch.Size(shape).numel())
                    for kind, ps_ in parts.items():
                        flat = torch.cat(ps_) if ps_ else torch.zeros(0)
                        if flat.numel() != numel:
                            raise CheckpointError(f"{self.tag_dir}: optimizer state of {key!r} (mp rank {mp}) has "
                                                  f"{flat.numel()} elements over the DP partitions, expected {numel}")
                        slot = shards[kind].setdefault(canon, [None] * tp)
                        if slot[mp % tp] is None:
                            slot[mp % tp] = flat.view(shape).to(torch.float32).clone()
        self._fp32 = self._join(shards.pop("fp32"), "fp32 master weight")
        return self._finish_moments(shards, steps)

    def _finish_moments(self, shards, steps):
        if not steps:  # saved before the first step: no moments to carry
            return {}, None
        if len(steps) > 1:
            raise CheckpointError(f"{self.tag_dir}: Adam step counts differ between parameters ({sorted(steps)})")
        return {k: self._join(v, k) for k, v in shards.items()}, (steps.pop() if steps else None)

    def master_state_dict(self) -> Dict[str, torch.Tensor]:
        """The fp32 master weights: ZeRO-1/2 partitions when present (exact under bf16), else the module's."""
        if not self.canonical and self.zero_stage in (1, 2):
            self.optimizer_state()
            if getattr(self, "_fp32", None):
                return self._fp32
        return self.state_dict()  # ZeRO-0 (the parameters are the masters) or saved before the first step

    # ---- counters ------------------------------------------------------------------------
    def train_state(self) -> TrainState:
        src = self.meta if self.meta else (self.first.get("megaslm") if isinstance(self.first.get("megaslm"), dict)
                                           else self.first)
        if not src or "step" not in src:
            return TrainState()
        return TrainState.from_dict(src, os.path.join(self.tag_dir, META))

    def engine_counters(self) -> Dict[str, Any]:
        """DeepSpeed's step counters and the LR-scheduler state as saved."""
        if self.canonical:
            return {k: self.meta.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}
        return {k: self.first.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}


def read_checkpoint(path: str, config=None) -> Tuple[RunConfig, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(RunConfig, canonical full fp32 state dict, metadata: TrainState fields, lr_scheduler, global_steps, tag)."""
    ck = Checkpoint(path, config)
    full = ck.state_dict()
    meta: Dict[str, Any] = dict(ck.meta)
    meta.update(ck.train_state().to_dict())
    meta.update({k: v for k, v in ck.engine_counters().items()})
    meta["tag"] = os.path.basename(os.path.normpath(ck.tag_dir))
    return ck.cfg, full, meta


# ------------------------------------------------------------------------------------------------
# the canonical (layout-free) checkpoint: written without an engine, loaded into any layout
# ------------------------------------------------------------------------------------------------
def write_canonical(out_dir: str, cfg: RunConfig, full: Dict[str, torch.Tensor],
                    moments: Dict[str, Dict[str, torch.Tensor]], adam_step: Optional[float], state: TrainState,
                    counters: Dict[str, Any]) -> str:
    """``<out_dir>/checkpoints/<tag>/`` (+ ``<out_dir>/config.yaml``) in the canonical format, atomically
    (written as ``<tag>.tmp`` then renamed; ``latest`` moved last). One process, no process group."""
    from safetensors.torch import save_file

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    tag = tag_for(state.step)
    final, tmp = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, tag + ".tmp")
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
    meta["files"] = write_manifest(tmp)
    write_json_atomic(os.path.join(tmp, META), meta)
    os.rename(tmp, final)
    write_latest(ckpt_dir, tag)
    cfg.save(os.path.join(out_dir, "config.yaml"))
    return final


@torch.no_grad()
def load_canonical_into(trainer, tag_dir: str) -> TrainState:
    """Weights, Adam moments (+ step), DeepSpeed counters of a canonical checkpoint into a built trainer
    of any layout; returns its TrainState. RNG states are not carried (another world size has other ranks)."""
    from megaslm import sharding

    ck = Checkpoint(tag_dir, trainer.cfg)
    full = ck.state_dict()
    moments, adam_step = ck.optimizer_state()
    try:
        sharding.load_full_state_dict(trainer.chunks, trainer.cfg, full, strict=True)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{tag_dir}: does not fit the model: {_one_line(e)}") from None
    set_optimizer_state(trainer.engine, trainer.chunks, trainer.cfg, full, moments, adam_step)
    c = ck.engine_counters()
    if c.get("global_steps") is not None:
        trainer.engine.global_steps = int(c["global_steps"])
        trainer.engine.global_samples = int(c.get("global_samples") or 0)
        trainer.engine.skipped_steps = int(c.get("skipped_steps") or 0)
    return ck.train_state()


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
        # fragment of it only then (``_lazy_init_hp_params_optimizer_state``, a private method: the one
        # DeepSpeed internal this relies on). Create the state now, then let DeepSpeed link it.
        for flat in flats:
            st = base.state[flat]
            if "exp_avg" not in st:
                st.update(step=step_t.clone(), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if not hasattr(zo, "_lazy_init_hp_params_optimizer_state"):
            raise CheckpointError(f"DeepSpeed {type(zo).__name__} cannot take Adam moments (no optimizer-state "
                                  f"linkage in this DeepSpeed version)")
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()
    for _, p, spec in sharding.iter_params(chunks, cfg):
        if hasattr(p, "_hp_mapping"):  # ZeRO / bf16 optimizer (None: no fragment of it on this DP rank)
            if p._hp_mapping is None:
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


def sync_master_weights(engine, chunks) -> None:
    """After parameters were changed in place (an HF init), copy them into ZeRO's fp32 master partitions."""
    from deepspeed.utils import safe_set_full_fp32_param

    for c in chunks:
        for p in c.parameters():
            if getattr(p, "_hp_mapping", None) is not None:
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
    scheduler._last_lr = lrs
