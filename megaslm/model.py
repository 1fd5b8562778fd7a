"""The speech-unit decoder: a megatron-core ``GPTModel`` over a unit vocabulary.

One builder (``build_model``) serves training, evaluation and conversion. Layer spec: megatron-core's
local spec (RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QKV bias), with the core
attention swapped for our document-masked attention (kernels/: FlexAttention on GPU unless a stored
measurement promotes our Triton kernel, SDPA on CPU; ``resolve_attention``); with sequence parallelism
the norms become ``SequenceParallelRMSNorm``. Those are changes of spec. The word embedding is not:
megatron-core's GPTModel builds its embedding itself (it takes no spec for it), so after the build
``megaslm.layers.swap_embedding`` turns that ``VocabParallelEmbedding`` into our fused unit embedding in
place (same object and parameters, another class: only ``forward`` changes).

Initialisation is layout-independent: every parameter is drawn as its full (unsharded) tensor from a
generator seeded by (run seed, canonical parameter name) and then sliced to this rank's shard, so
TP=1, TP=2, PP=2 ... start from bit-identical weights (``megaslm.sharding`` knows the layouts).
"""
from __future__ import annotations

import hashlib
import math
import types
from typing import List, Optional

import torch
import torch.nn.functional as F

from megaslm.config import RunConfig


def transformer_config(cfg: RunConfig, cuda: Optional[bool] = None):
    """The megatron-core TransformerConfig derived from our config (never hand-edited)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available() if cuda is None else cuda
    m, p = cfg.model, cfg.parallel
    precision = cfg.resolved_precision(cuda)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=m.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        **recompute_kwargs(cfg),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=not cuda,
        perform_initialization=False,  # we initialise layout-independently below
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
        deterministic_mode=m.deterministic,
        # gloo (and, per reports, some NCCL set-ups) swap activations with batched p2p in interleaved 1F1B
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=False,
    )


def recompute_kwargs(cfg: RunConfig) -> dict:
    """``model.recompute*`` -> megatron-core's recompute fields (megatron does the recomputing)."""
    m = cfg.model
    if m.recompute == "none":
        return {}
    if m.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(m.recompute_modules)}
    per_chunk = m.num_layers // (cfg.parallel.pipeline * (cfg.parallel.virtual_pipeline or 1))
    n = m.recompute_num_layers or (1 if m.recompute_method == "uniform" else per_chunk)
    return {"recompute_granularity": "full", "recompute_method": m.recompute_method, "recompute_num_layers": n}


def layer_spec(cfg: RunConfig, attention_backend: Optional[str] = None):
    """megatron-core local layer spec with our core attention (``attention_backend``: a resolved name,
    see ``resolve_attention``). With sequence parallelism: the block's submodules, whose norms (layer
    and final) are ``SequenceParallelRMSNorm`` (megatron's torch norm refuses sequence parallelism)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megaslm.layers import DocumentMaskedAttention, SequenceParallelRMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=DocumentMaskedAttention,
        params={"backend": attention_backend or resolve_attention(cfg, quiet=True)[0]},
    )
    if not cfg.parallel.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return lambda tcfg, vp_stage: TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(tcfg, vp_stage=vp_stage), layer_norm=SequenceParallelRMSNorm)


_ANNOUNCED: set = set()


def resolve_attention(cfg: RunConfig, quiet: bool = False) -> tuple:
    """(backend, reason) for ``model.attention_backend`` on this process's device (kernels/choice.py has the
    rule); printed once per process and choice on rank 0 unless ``quiet``. ``reference`` on a GPU at a
    sequence of 1024 or more warns with the score memory it keeps for backward."""
    import warnings

    from kernels.choice import AttentionShape, choose_attention, env_results_dir, reference_score_bytes

    m, p = cfg.model, cfg.parallel
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    shape = AttentionShape(cfg.resolved_precision(cuda), cfg.head_dim, m.num_attention_heads, m.num_query_groups,
                           m.seq_length)
    backend, reason = choose_attention(m.attention_backend, cuda, name, shape, env_results_dir())
    if not quiet and (backend, reason) not in _ANNOUNCED:
        _ANNOUNCED.add((backend, reason))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            print(f"attention: {backend} ({reason})", flush=True)
        if cuda and backend == "reference" and m.seq_length >= 1024 and rank == 0:
            layers = m.num_layers // p.pipeline
            est = reference_score_bytes(cfg.schedule.micro_batch_size, m.num_attention_heads // p.tensor,
                                        m.seq_length, layers)
            warnings.warn(f"model.attention_backend=reference on a GPU at seq_length {m.seq_length}: the dense "
                          f"fp32 attention probabilities kept for backward take ~{est / 2**30:.1f} GiB per "
                          f"micro-batch over {layers} layers; use flex (or auto)", stacklevel=2)
    return backend, reason


def build_model(cfg: RunConfig, init: bool = True) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage; a list of one without VPP).

    Requires ``megaslm.parallel.initialize(cfg)`` to have run. Weights: the layout-independent init
    (``init=True``); ``model.init_from`` is NOT applied here (see ``megaslm.interop.hf.apply_init_from``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megaslm import cpu_compat
    from megaslm.layers import swap_embedding

    tcfg = transformer_config(cfg)
    backend, _ = resolve_attention(cfg)
    spec = layer_spec(cfg, backend)
    m = cfg.model
    vpp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vpp or 1):
        vs = vp_stage if vpp else None
        with cpu_compat.tensor_cuda_is_identity():
            model = GPTModel(
                config=tcfg,
                transformer_layer_spec=spec(tcfg, vs) if isinstance(spec, types.FunctionType) else spec,
                vocab_size=cfg.padded_vocab_size(),
                max_sequence_length=m.max_position_embeddings or m.seq_length,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vs),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vs),
                parallel_output=True,
                share_embeddings_and_output_weights=m.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=m.rotary_base,
                rope_scaling=m.rope_scaling,
                rope_scaling_factor=m.rope_scaling_factor,
                vp_stage=vs,
            )
        if model.pre_process:
            swap_embedding(model, cfg)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if init:
        init_weights(chunks, cfg)
    # ``model.init_from`` (an HF model) is a step after this one, applied by the caller
    # (``megaslm.interop.hf.apply_init_from``): the model never imports the interop package.
    return chunks


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(chunks: List[torch.nn.Module], cfg: RunConfig) -> None:
    """Layout-independent init: full tensor from (seed, canonical name), then this rank's shard.

    Linear and embedding weights ~ N(0, std); the two residual-branch outputs (attention proj, MLP fc2)
    ~ N(0, std / sqrt(2 * num_layers)) as in megatron's scaled init; norms 1; biases 0.
    """
    from megaslm import sharding

    std = cfg.model.init_method_std
    out_std = std / math.sqrt(2.0 * cfg.model.num_layers)
    for name, param, spec in sharding.iter_params(chunks, cfg):
        # megatron sets these only inside its own init (which we skip); DeepSpeed's grad norm and
        # megatron's helpers read them to tell TP-sharded parameters from replicated ones
        param.tensor_model_parallel = spec.split_dim >= 0 and spec.tp_size > 1
        param.partition_dim = spec.split_dim if spec.split_dim >= 0 else -1
        param.partition_stride = 1
        canon = spec.canonical
        if canon.endswith("layer_norm_weight") or canon.endswith("layernorm.weight") or canon.endswith("norm.weight"):
            full = torch.ones(spec.full_shape)
        elif canon.endswith(".bias"):
            full = torch.zeros(spec.full_shape)
        else:
            g = torch.Generator().manual_seed(_param_seed(cfg.seed, canon))
            s = out_std if (canon.endswith("linear_proj.weight") or canon.endswith("linear_fc2.weight")) else std
            full = torch.randn(spec.full_shape, generator=g, dtype=torch.float32) * s
        param.copy_(spec.shard(full).to(param.dtype))


def num_parameters(chunks: List[torch.nn.Module]) -> int:
    """Parameters held by this rank (shards), counting a tied output weight once."""
    seen = set()
    n = 0
    for c in chunks:
        for p in c.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n
