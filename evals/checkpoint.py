"""Engine-free checkpoint reading: DeepSpeed model files -> one canonical full state dict.

A run writes ``<output_dir>/checkpoints/<tag>/mp_rank_XX_model_states.pt`` (one file per rank of the
combined TP x PP group: ``XX = pp * TP + tp``, megatron-core's order) whose ``module`` entry is the
rank's state dict (a ``ModuleList`` of pipeline chunks, keys ``<chunk>.<name>``, when PP > 1) and
whose client state holds the run's resolved ``config``. We read those files directly (no DeepSpeed
engine, no optimizer state), rename every tensor to its canonical TP=1/PP=1 name, and concatenate
the TP shards with ``megaslm.sharding``'s layout table. The result loads into ANY layout with
``sharding.load_full_state_dict``.

ZeRO-3 checkpoints keep parameters in the optimizer shards; they are refused with a clear error
(convert with ``deepspeed.utils.zero_to_fp32`` first).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from megaslm.config import ConfigError, RunConfig, config_digest, config_from_dict, load_config
from megaslm.sharding import ParamSpec, split_rule

from evals.errors import EvalError

_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))


def find_checkpoints(path: str) -> List[str]:
    """Checkpoint directories under ``path``: a checkpoint itself, a ``checkpoints/`` folder, or a run directory."""
    if is_checkpoint(path):
        return [path]
    for d in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(d):
            tags = sorted(t for t in os.listdir(d) if is_checkpoint(os.path.join(d, t)))
            if tags:
                return [os.path.join(d, t) for t in sorted(tags, key=_step_key)]
    if not os.path.exists(path):
        raise EvalError(f"{path}: checkpoint or run directory not found")
    raise EvalError(f"{path}: no checkpoint found (expected mp_rank_XX_model_states.pt here or under checkpoints/<tag>/)")


def _step_key(tag: str):
    m = re.search(r"(\d+)$", tag)
    return (int(m.group(1)) if m else -1, tag)


def checkpoint_step(ckpt: str) -> Optional[int]:
    m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None


def _load(path: str) -> Dict:
    try:
        # DeepSpeed's model-state files hold plain containers, tensors and torch.Size: the safe loader works
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvalError(f"{path}: checkpoint file not found") from None
    except Exception as e:  # noqa: BLE001 - report which file could not be read and why
        raise EvalError(f"{path}: cannot read as a DeepSpeed model-state file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _mp_files(ckpt: str) -> Dict[int, str]:
    out = {}
    for fp in glob.glob(os.path.join(ckpt, "mp_rank_*_model_states.pt")):
        m = _MP_FILE.match(os.path.basename(fp))
        if m:
            out[int(m.group(1))] = fp
    if not out:
        raise EvalError(f"{ckpt}: no mp_rank_XX_model_states.pt files")
    return out


def read_config(ckpt: str) -> RunConfig:
    """The run config of a checkpoint (see ``_config_of``)."""
    files = _mp_files(ckpt)
    return _config_of(_load(files[min(files)]), files[min(files)])


def _config_of(sd: Dict, where: str) -> RunConfig:
    """The config saved with the checkpoint: ``config`` in the client state (top level or under
    ``megaslm``), else the run's resolved ``<run>/config.yaml`` (``<run>/checkpoints/<tag>/``),
    checked against the checkpoint's ``config_digest`` when it records one."""
    client = sd.get("megaslm") if isinstance(sd.get("megaslm"), dict) else {}
    tree = sd.get("config") or client.get("config")
    if tree is not None:
        try:
            return config_from_dict(tree)
        except ConfigError as e:
            raise EvalError(f"{where}: saved config: {e}") from None
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(where))))
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise EvalError(f"{where}: no config in the checkpoint and no {path} (not a megaslm run?)")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise EvalError(f"{path}: {e}") from None
    digest = client.get("config_digest")
    if digest and config_digest(cfg) != digest:
        raise EvalError(f"{path}: config does not match the checkpoint {os.path.dirname(where)} (digest "
                        f"{config_digest(cfg)} vs recorded {digest}): the run's config changed after this save")
    return cfg


def layer_offset(cfg: RunConfig, pp_rank: int, vp_stage: int) -> int:
    L, P, V = cfg.model.num_layers, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline or 1
    per = L // (P * V)
    return vp_stage * (L // V) + pp_rank * per


def canonical_full_state_dict(ckpt: str) -> Tuple[RunConfig, Dict[str, torch.Tensor]]:
    """(saved config, canonical full fp32 state dict) of a checkpoint written at any layout."""
    files = _mp_files(ckpt)
    first = _load(files[min(files)])
    cfg = _config_of(first, files[min(files)])
    if cfg.parallel.zero_stage == 3:
        raise EvalError(f"{ckpt}: ZeRO-3 checkpoint: the model files hold no weights; convert it first with "
                        f"deepspeed.utils.zero_to_fp32 (python zero_to_fp32.py {os.path.dirname(ckpt)} out.pt) "
                        f"— not supported here")
    T, P, V = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    need = T * P
    missing = [i for i in range(need) if i not in files]
    if missing:
        raise EvalError(f"{ckpt}: model-parallel files missing for ranks {missing} (config says TP={T} x PP={P})")
    shards: Dict[str, List[Optional[torch.Tensor]]] = {}
    for mp in range(need):
        tp, pp = mp % T, mp // T
        sd = first if mp == min(files) else _load(files[mp])
        module = sd.get("module")
        if not isinstance(module, dict) or not module:
            raise EvalError(f"{files[mp]}: no 'module' state dict")
        for key, t in module.items():
            if key.endswith("_extra_state") or not torch.is_tensor(t):
                continue
            name, vp = key, 0
            if P > 1 or V:
                head, _, rest = key.partition(".")
                if not head.isdigit():
                    raise EvalError(f"{files[mp]}: unexpected key {key!r} for a pipeline checkpoint")
                vp, name = int(head), rest
            m = _LAYER.match(name)
            if m:
                name = f"decoder.layers.{layer_offset(cfg, pp, vp) + int(m.group(1))}.{m.group(2)}"
            elif name == "output_layer.weight" and cfg.model.tie_embeddings:
                continue  # the last stage's copy of the tied embedding
            try:
                split_rule(name)
            except KeyError:
                continue  # buffers (e.g. rotary frequencies) are rebuilt by the model
            slot = shards.setdefault(name, [None] * T)
            if slot[tp] is None:
                slot[tp] = t.detach().to(torch.float32)
    full: Dict[str, torch.Tensor] = {}
    for name, parts in shards.items():
        dim, glu = split_rule(name)
        if dim < 0:
            full[name] = parts[0] if parts[0] is not None else next(p for p in parts if p is not None)
            continue
        if any(p is None for p in parts):
            raise EvalError(f"{ckpt}: tensor {name} lacks shards for some tensor-parallel ranks")
        full[name] = ParamSpec(name, (), dim, glu, 0, T).unshard(parts)  # type: ignore[arg-type]
    return cfg, full
