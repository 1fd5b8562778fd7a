"""Read a DeepSpeed checkpoint written by ``megaslm.train.Trainer`` (any TP/PP/VPP layout, ZeRO-0/1/2)
into canonical full tensors, offline and in one process, and export it to a Hugging Face directory.

Layout of a checkpoint tag directory: one ``mp_rank_XX_model_states.pt`` per rank of the combined
TP x PP group, ``XX = tp + pp * TP`` (megatron orders ranks tp fastest, then dp, then pp; verified by
saving a TP=2 x PP=2 run). Each file's ``module`` is that rank's model state dict: the chunk itself at
PP=1, a ``ModuleList`` of the VPP chunks (keys ``<chunk>.<name>``) at PP>1. The run's resolved config
(``config.yaml`` in the tag directory, written by ``reshard``/``import-hf``, or the run directory's
``config.yaml`` written by ``megaslm.train.run``, or one given explicitly) gives the layout; it is
checked against DeepSpeed's recorded ``checkpoint_parallel_dimensions`` and the tensor shapes. Counters
come from the trainer's ``meta.json``. Files are read with ``torch.load(weights_only=True)``:
DeepSpeed 0.19.8's model-states files hold only tensors, containers and primitives, so no pickle
allow-listing is needed (and none of arbitrary classes is done).

ZeRO-3 partitions the module's parameters into the optimizer files (the ``module`` tensors are empty
placeholders): refused with an error (use DeepSpeed's ``zero_to_fp32.py`` first).
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from megaslm.interop.errors import InteropError

_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
EMB_NAME = "embedding.word_embeddings.weight"


def resolve_tag_dir(path: str) -> str:
    """A tag directory (holding mp_rank_*_model_states.pt) from it or from its parent (with ``latest``)."""
    if not os.path.isdir(path):
        raise InteropError(f"{path}: checkpoint directory not found")
    if any(_MP_FILE.match(f) for f in os.listdir(path)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            tag = f.read().strip()
        d = os.path.join(path, tag)
        if not os.path.isdir(d):
            raise InteropError(f"{latest}: names tag {tag!r} but {d} does not exist")
        return d
    ck = os.path.join(path, "checkpoints")
    if os.path.isdir(ck):
        return resolve_tag_dir(ck)
    raise InteropError(f"{path}: no mp_rank_*_model_states.pt and no 'latest' file (not a DeepSpeed checkpoint)")


def safe_load(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InteropError(f"{path}: not found") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"{path}: refused by torch.load(weights_only=True): {msg}") from None


def _chunk_layer_offset(cfg, pp_rank: int, vp: int) -> int:
    """Global index of a chunk's first layer (megatron's uniform split, VPP-aware)."""
    L, pp = cfg.model.num_layers, cfg.parallel.pipeline
    vpp = cfg.parallel.virtual_pipeline or 1
    per = L // (pp * vpp)
    return vp * (L // vpp) + pp_rank * per


def _find_config(tag_dir: str, first: Dict[str, Any], config):
    """The run config of a checkpoint: given, or saved with it (client state / tag dir / run dir)."""
    from megaslm.config import ConfigError, RunConfig, config_from_dict, load_config

    try:
        if isinstance(config, RunConfig):
            return config
        if isinstance(config, str):
            return load_config(config)
        if isinstance(first.get("config"), dict):
            return config_from_dict(first["config"])
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag_dir)))
        for cand in (os.path.join(tag_dir, "config.yaml"), os.path.join(run_dir, "config.yaml")):
            if os.path.exists(cand):
                return load_config(cand)
    except ConfigError as e:
        raise InteropError(f"{tag_dir}: run config: {e}") from None
    raise InteropError(f"{tag_dir}: no run config found (neither {tag_dir}/config.yaml nor the run directory's "
                       f"config.yaml): pass --config")


def read_checkpoint(path: str, config=None) -> Tuple[Any, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(RunConfig, canonical full fp32 state dict, metadata: counters, lr_scheduler, global_steps, tag).

    ``config`` (a RunConfig or a YAML path) is only needed when the checkpoint has no config beside it.
    """
    import json

    from megaslm import sharding

    tag_dir = resolve_tag_dir(path)
    files = sorted((int(m.group(1)), f) for f in os.listdir(tag_dir) if (m := _MP_FILE.match(f)))
    first = safe_load(os.path.join(tag_dir, files[0][1]))
    cfg = _find_config(tag_dir, first, config)
    zero = (first.get("ds_config") or {}).get("zero_optimization", {}).get("stage", cfg.parallel.zero_stage)
    if zero == 3:
        raise InteropError(f"{tag_dir}: ZeRO-3 checkpoints are not supported (parameters live in the optimizer "
                           f"partitions; consolidate with DeepSpeed's zero_to_fp32.py first)")
    dims = first.get("checkpoint_parallel_dimensions") or {}
    for key, fld in (("tp_degree", "tensor"), ("pp_degree", "pipeline")):
        if key in dims and int(dims[key]) != getattr(cfg.parallel, fld):
            raise InteropError(f"parallel.{fld}: the config says {getattr(cfg.parallel, fld)} but {tag_dir} "
                               f"was written with {dims[key]}")
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    want = list(range(tp * pp))
    if [r for r, _ in files] != want:
        raise InteropError(f"{tag_dir}: expected model-state files for mp ranks {want} (TP={tp} x PP={pp}), "
                           f"found {[r for r, _ in files]}")
    tied = cfg.model.tie_embeddings
    shards: Dict[str, List[Optional[torch.Tensor]]] = {}
    for mp, fname in files:
        sd = first if mp == 0 else safe_load(os.path.join(tag_dir, fname))
        if "module" not in sd:
            raise InteropError(f"{os.path.join(tag_dir, fname)}: field 'module' missing")
        t_rank, p_rank = mp % tp, mp // tp
        for key, val in sd["module"].items():
            if not torch.is_tensor(val) or key.endswith("_extra_state"):
                continue
            vp, name = 0, key
            if pp > 1:
                head, _, name = key.partition(".")
                vp = int(head)
            m = _LAYER.match(name)
            if m:
                canon = f"decoder.layers.{_chunk_layer_offset(cfg, p_rank, vp) + int(m.group(1))}.{m.group(2)}"
            elif name == "output_layer.weight" and tied:
                canon = "embedding.word_embeddings.weight"
                if canon in shards and shards[canon][t_rank] is not None:
                    continue  # the last stage's copy of the tied weight; the first stage's is the same
            else:
                canon = name
            if val.numel() == 0:
                raise InteropError(f"{fname}: tensor {key!r} is empty (a ZeRO-3 partitioned checkpoint?)")
            shards.setdefault(canon, [None] * tp)[t_rank] = val.detach().to(torch.float32)
    full: Dict[str, torch.Tensor] = {}
    for canon, parts in shards.items():
        if any(p is None for p in parts):
            raise InteropError(f"{tag_dir}: tensor {canon!r}: shards missing for TP ranks "
                               f"{[i for i, p in enumerate(parts) if p is None]}")
        dim, glu = sharding.split_rule(canon)
        spec = sharding.ParamSpec(canon, (), dim, glu, 0, tp)
        full[canon] = spec.unshard(parts).contiguous() if dim >= 0 else parts[0]
    if EMB_NAME in full and full[EMB_NAME].shape[0] != cfg.padded_vocab_size():
        raise InteropError(f"{tag_dir}: tensor {EMB_NAME!r} has {full[EMB_NAME].shape[0]} rows but the config's "
                           f"padded vocabulary is {cfg.padded_vocab_size()} (vocab / model.make_vocab_size_divisible_by)")
    # counters: the trainer's meta.json (current format) or the client state (older saves)
    meta: Dict[str, Any] = {}
    mj = os.path.join(tag_dir, "meta.json")
    if os.path.exists(mj):
        with open(mj) as f:
            meta.update(json.load(f))
    else:
        client = first.get("megaslm") if isinstance(first.get("megaslm"), dict) else first
        meta.update({k: client.get(k) for k in ("step", "tokens_seen", "stage_index", "stage_step") if k in client})
    for k in ("lr_scheduler", "global_steps", "global_samples"):
        meta[k] = first.get(k)
    meta["tag"] = os.path.basename(os.path.normpath(tag_dir))
    return cfg, full, meta


def export_hf(checkpoint: str, out_dir: str, arch: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, config=None) -> str:
    """Checkpoint (any layout) -> HF directory loadable by AutoModelForCausalLM.from_pretrained offline."""
    from megaslm.interop.hf import save_hf

    cfg, full, _ = read_checkpoint(checkpoint, config)
    return save_hf(full, cfg, out_dir, arch=arch, dtype=dtype)
