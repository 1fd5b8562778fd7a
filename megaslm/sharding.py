"""How each parameter of our GPTModel is laid out across tensor- and pipeline-parallel ranks.

The *canonical* name of a parameter is its name in a TP=1, PP=1 model (global layer index); the
*full* tensor is its TP=1 value. Layout-independent init, full-state-dict gather/scatter (export,
reshard, tests) and Hugging Face import all go through ``ParamSpec.shard`` / ``gather_full``.

Megatron-core's own dist-checkpointing knows these layouts too, but needs a sharded-state-dict
round trip through its (CUDA-oriented) strategies; this small table is what conversion and
layout-independent init need, with no I/O.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
EMB = "embedding.word_embeddings.weight"
OUT = "output_layer.weight"                      # untied output layer (the last stage's copy when tied)
LANG = "embedding.word_embeddings.lang_weight"   # model.language_embedding: [1 + languages, hidden]


@dataclasses.dataclass
class ParamSpec:
    canonical: str
    full_shape: Tuple[int, ...]
    split_dim: int          # -1: replicated across TP
    glu: bool               # SwiGLU fc1: [gate; up] halves are split separately
    tp_rank: int
    tp_size: int

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        if self.split_dim < 0 or self.tp_size == 1:
            return full
        if self.glu:
            gate, up = full.chunk(2, dim=self.split_dim)
            return torch.cat([gate.chunk(self.tp_size, dim=self.split_dim)[self.tp_rank],
                              up.chunk(self.tp_size, dim=self.split_dim)[self.tp_rank]], dim=self.split_dim)
        return full.chunk(self.tp_size, dim=self.split_dim)[self.tp_rank].contiguous()

    def unshard(self, shards: List[torch.Tensor]) -> torch.Tensor:
        """Full tensor from the shards of all TP ranks (in TP-rank order)."""
        if self.split_dim < 0 or self.tp_size == 1:
            return shards[0]
        if self.glu:
            halves = [s.chunk(2, dim=self.split_dim) for s in shards]
            return torch.cat([torch.cat([h[0] for h in halves], dim=self.split_dim),
                              torch.cat([h[1] for h in halves], dim=self.split_dim)], dim=self.split_dim)
        return torch.cat(shards, dim=self.split_dim)


def split_rule(canonical: str) -> Tuple[int, bool]:
    """(split dim, glu) of a canonical parameter name."""
    if canonical in (EMB, OUT):
        return 0, False
    if canonical.endswith("linear_qkv.weight") or canonical.endswith("linear_qkv.bias"):
        return 0, False
    if canonical.endswith("linear_fc1.weight"):
        return 0, True
    if canonical.endswith("linear_proj.weight") or canonical.endswith("linear_fc2.weight"):
        return 1, False
    if canonical.endswith("norm.weight") or canonical.endswith("layernorm.weight"):
        return -1, False
    if canonical == LANG:
        return -1, False      # the language table: small, replicated on every TP rank
    raise KeyError(f"no tensor-parallel layout known for parameter {canonical!r}")


def canonical_key(local_name: str, global_layer: Callable[[int], int], tied: bool) -> str:
    """The one rank-local -> canonical rule: a chunk's layer ``i`` is global layer ``global_layer(i)``;
    the last stage's ``output_layer.weight`` is the tied embedding when ``tied``; every other name is
    already canonical. Used on live chunks (``canonical_name``) and on saved state dicts (the
    checkpoint reader, with ``layer_offset``)."""
    m = _LAYER.match(local_name)
    if m:
        return f"decoder.layers.{global_layer(int(m.group(1)))}.{m.group(2)}"
    if local_name == OUT and tied:
        return EMB  # last pipeline stage's copy of the tied embedding
    return local_name


def canonical_name(chunk: torch.nn.Module, local_name: str, tied: bool) -> str:
    return canonical_key(local_name, lambda i: chunk.decoder.layers[i].layer_number - 1, tied)


def layer_offset(cfg, pp_rank: int, vp_stage: int) -> int:
    """Global index of a chunk's first layer (megatron's uniform split, VPP-aware)."""
    L, P, V = cfg.model.num_layers, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline or 1
    per = L // (P * V)
    return vp_stage * (L // V) + pp_rank * per


def decay_groups(named: Iterable[Tuple[str, torch.Tensor]]) -> List[List[Tuple[str, torch.Tensor]]]:
    """The optimizer's parameter groups, in order: weight decay on matrices, none on 1-D tensors and
    biases (megatron's convention); ``[decay]`` or ``[decay, no_decay]``. The one rule:
    ``megaslm.train.param_groups`` builds the optimizer with it, the checkpoint reader re-derives the
    groups of a saved module with it. ``named``: (name, tensor) pairs in module order."""
    decay: List[Tuple[str, torch.Tensor]] = []
    no_decay: List[Tuple[str, torch.Tensor]] = []
    for name, t in named:
        (no_decay if (t.dim() == 1 or name.endswith(".bias")) else decay).append((name, t))
    return [decay, no_decay] if no_decay else [decay]


def iter_params(chunks: List[torch.nn.Module], cfg) -> Iterator[Tuple[str, torch.nn.Parameter, ParamSpec]]:
    """(local name, parameter, spec) for every parameter this rank holds (a tied weight once per chunk)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            canon = canonical_name(chunk, name, cfg.model.tie_embeddings)
            dim, glu = split_rule(canon)
            shape = list(p.shape)
            if dim >= 0:
                shape[dim] *= tp_size
            yield name, p, ParamSpec(canon, tuple(shape), dim, glu, tp_rank, tp_size)


@torch.no_grad()
def load_full_state_dict(chunks: List[torch.nn.Module], cfg, full: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy canonical full tensors into this rank's shards."""
    missing = []
    for name, p, spec in iter_params(chunks, cfg):
        if spec.canonical not in full:
            missing.append(spec.canonical)
            continue
        t = full[spec.canonical]
        if tuple(t.shape) != spec.full_shape:
            raise ValueError(f"{spec.canonical}: shape {tuple(t.shape)} but the model expects {spec.full_shape}")
        p.copy_(spec.shard(t.to(torch.float32)).to(p.dtype))
    if strict and missing:
        raise KeyError(f"missing tensors for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


@torch.no_grad()
def gather_full_state_dict(chunks: List[torch.nn.Module], cfg) -> Dict[str, torch.Tensor]:
    """Canonical full (fp32, CPU) tensors assembled from every TP and PP rank; identical on all ranks.

    Collective over the world: every rank must call it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    local: Dict[str, torch.Tensor] = {}
    for name, p, spec in iter_params(chunks, cfg):
        if spec.canonical in local:
            continue
        t = p.detach().to(torch.float32)
        if spec.split_dim >= 0 and tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = spec.unshard(parts)
        local[spec.canonical] = t.cpu()
    # merge across pipeline stages (TP ranks hold identical full tensors now)
    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return local
    gathered: List[Dict[str, torch.Tensor]] = [None] * pp_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
    out: Dict[str, torch.Tensor] = {}
    for d in gathered:
        for k, v in d.items():
            out.setdefault(k, v)
    return out
