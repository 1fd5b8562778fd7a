"""The offline reader: one checkpoint directory of any layout -> canonical state, in one process.

DeepSpeed layout (what training writes): ``mp_rank_XX_model_states.pt`` per rank of the combined TP x PP
group (``XX = tp + pp * TP``; ``module`` is the rank's state dict, a ``ModuleList`` of the VPP chunks
with keys ``<chunk>.<name>`` when PP > 1), ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` per DP x MP
rank at ZeRO-1/2 (flat partitions of the fp32 master weights and Adam moments, with
``param_slice_mappings`` saying where each parameter lies), ``meta.json`` (``TrainState``, the resolved
config, a manifest). Canonical layout: ``megaslm.checkpoint.canonical``.

Rules shared by every reader: the tied output weight (``output_layer.weight`` of the last pipeline stage
when ``model.tie_embeddings``) is the embedding (the first stage's copy is kept); buffers and
``_extra_state`` entries are not parameters and are skipped (the model rebuilds them); rank-local names
become canonical and TP shards are joined by ``megaslm.sharding``. Every file is read with
``megaslm.checkpoint.safe.safe_load``; every failure is a one-line ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from megaslm.checkpoint.layout import (CANON_MODEL, CANON_OPTIM, META, MOMENTS, MP_FILE, OPTIM_FILE,
                                       CheckpointError, TrainState, is_canonical, one_line, read_meta,
                                       resolve_tag_dir)
from megaslm.checkpoint.safe import safe_load
from megaslm.config import ConfigError, RunConfig, config_digest
from megaslm.config_io import config_from_dict, load_config
from megaslm.sharding import EMB, ParamSpec, canonical_key, decay_groups, layer_offset, split_rule


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
        """Canonical name of a rank-local key (``megaslm.sharding.canonical_key``); None for extra state."""
        cfg = self.cfg
        if key.endswith("_extra_state"):
            return None
        vp, name = 0, key
        if cfg.parallel.pipeline > 1 or cfg.parallel.virtual_pipeline:
            head, _, rest = key.partition(".")
            if not head.isdigit():
                raise CheckpointError(f"{self.tag_dir}: unexpected key {key!r} for a pipeline checkpoint")
            vp, name = int(head), rest
        first = layer_offset(cfg, p_rank, vp)
        return canonical_key(name, lambda i: first + i, cfg.model.tie_embeddings)

    def _join(self, shards: Dict[str, List[Optional[torch.Tensor]]], what: str) -> Dict[str, torch.Tensor]:
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
            raise CheckpointError(f"{p}: not a readable safetensors file ({one_line(e)})") from None

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
        passes them (module order, grouped by ``megaslm.sharding.decay_groups``)."""
        sd = self._load(dict(self.mp_files)[mp])
        buffers = set(sd.get("buffer_names") or [])
        named = [(key, val) for key, val in sd["module"].items()
                 if not (key.endswith("_extra_state") or key in buffers or not torch.is_tensor(val))]
        return [[key for key, _ in group] for group in decay_groups(named)]

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

