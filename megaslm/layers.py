"""Our modules inside megatron-core's GPTModel: document-masked core attention, the fused unit embedding and
the sequence-parallel RMSNorm.

The first two delegate the math to ``kernels/`` (attention: FlexAttention / SDPA / Triton / reference, the
backend resolved once per model by ``megaslm.model.resolve_attention``); this file only
adapts megatron-core's calling conventions ([s, b, h, d] tensors, vocab-parallel shards, the TP
all-reduce) to the kernels' ones.

Language embedding (``model.language_embedding``): the word embedding also holds ``lang_weight``
[1 + len(vocab.languages), hidden] and adds ``lang_weight[lang_ids[t]]`` to every token. megatron's
``GPTModel.forward`` has no argument for per-token side inputs, so the ids reach the embedding by
``language_ids(chunk, ids)``: a context manager that sets them on the chunk's embedding module for
one forward call and clears them after (a no-op on chunks without the embedding, i.e. later pipeline
stages). Every place where a batch meets the model wraps the call in it (megaslm/train.py, evals/engine.py);
a forward of a model with a language table without ids is an error, never a silent zero.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                   reduce_from_tensor_model_parallel_region,
                                                   reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.module import MegatronModule


def _force(backend: str) -> Optional[str]:
    """Config embedding backend -> the kernels' ``force`` argument (None: Triton on GPU, reference on CPU)."""
    return {"auto": None, "triton": "triton", "reference": "reference"}[backend]


def _attention_fn(backend: str):
    """A resolved attention backend (megaslm.model.resolve_attention) -> fn(q, k, v, seg, scale, deterministic)."""
    if backend == "flex":
        from kernels.flex import flex_segment_attention
        return lambda q, k, v, seg, scale, det: flex_segment_attention(q, k, v, seg, softmax_scale=scale)
    if backend == "sdpa":
        from kernels.flex import sdpa_segment_attention
        return lambda q, k, v, seg, scale, det: sdpa_segment_attention(q, k, v, seg, softmax_scale=scale)
    if backend in ("triton", "reference"):
        from kernels.attention import segment_attention
        return lambda q, k, v, seg, scale, det: segment_attention(q, k, v, seg, softmax_scale=scale, force=backend,
                                                                  deterministic=det)
    raise ValueError(f"attention backend: expected flex, sdpa, triton or reference, got {backend!r}")


class DocumentMaskedAttention(MegatronModule):
    """Causal attention that never crosses a document (segment) boundary of a packed sequence.

    Drop-in for megatron-core's ``DotProductAttention`` in the layer spec. The per-token segment ids
    arrive through GPTModel's ``attention_mask`` argument as an integer tensor [b, s]; ``None`` means
    one segment per row (plain causal attention).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, backend: str = "sdpa"):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("DocumentMaskedAttention does not support context parallelism")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError("DocumentMaskedAttention implements attention_dropout=0 only")
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.backend = backend
        self._attend = _attention_fn(backend)
        # model.deterministic (megatron's deterministic_mode) selects the atomic-free, bit-reproducible backward
        self.deterministic = True if getattr(config, "deterministic_mode", False) else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("DocumentMaskedAttention takes segment ids, not attention_bias/packed_seq_params")
        s, b = query.shape[0], query.shape[1]
        if attention_mask is None:
            segments = torch.zeros(b, s, dtype=torch.int32, device=query.device)
        elif attention_mask.dim() == 2 and not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool:
            segments = attention_mask
        else:
            raise ValueError(f"DocumentMaskedAttention expects integer segment ids [b, s] as attention_mask, "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        # [s, b, h, d] -> [b, s, h, d]
        q = query.transpose(0, 1)
        k = key.transpose(0, 1)
        v = value.transpose(0, 1)
        out = self._attend(q, k, v, segments, self.softmax_scale, self.deterministic)
        return out.transpose(0, 1).reshape(s, b, self.heads * self.head_dim)


class UnitVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron-core's vocab-parallel embedding with the lookup done by the fused unit-embedding kernel.

    Same parameter (``weight``: this rank's vocabulary shard), same all-reduce; the mask / subtract /
    gather / zero sequence is one kernel pass. Installed by ``swap_embedding``.
    """

    embedding_force: Optional[str] = None
    # ``lang_weight`` (a registered Parameter, no class attribute: that would shadow it) exists only
    # with model.language_embedding; read it as getattr(self, "lang_weight", None)
    add_lang: bool = True                              # add the language rows here (TP rank 0 only)
    lang_ids: Optional[torch.Tensor] = None            # set per forward by ``language_ids``

    def forward(self, input_):
        from kernels.embedding import fused_unit_embedding

        lang_weight = getattr(self, "lang_weight", None)
        lang_ids = None
        if lang_weight is not None:
            lang_ids = self.lang_ids
            if lang_ids is None:
                raise RuntimeError("model.language_embedding=true: this forward got no per-token language ids "
                                   "(wrap the model call in megaslm.layers.language_ids)")
            if lang_ids.shape != input_.shape:
                raise ValueError(f"language ids: shape {tuple(lang_ids.shape)} but tokens {tuple(input_.shape)}")
        # megatron's deterministic_mode (TransformerConfig) selects the kernel's sorted, atomic-free backward.
        # The replicated language table is added on TP rank 0 only (the all-reduce below would count it
        # TP times); lang_grad_all_ranks gives every TP rank the same table gradient, so the replicas
        # stay identical without an extra all-reduce (kernels/embedding.py).
        out = fused_unit_embedding(input_, self.weight, self.vocab_start_index, lang_ids=lang_ids,
                                   lang_weight=lang_weight,
                                   add_lang=self.add_lang, lang_grad_all_ranks=True,
                                   deterministic=bool(self.deterministic_mode), force=self.embedding_force)
        if self.reduce_scatter_embeddings:
            # sequence parallelism, as megatron's own lookup does it: [b, s, h] -> [s, b, h], then the TP sum
            # and the split along the sequence in one reduce-scatter
            return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=self.tp_group)
        if self.tp_group.size() > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for sequence-parallel layers (megatron-core's torch norm wrapper refuses them).

    Under sequence parallelism each TP rank normalises a different slice of the sequence, so its weight
    gradient is partial. megatron sums such gradients in its DDP's ``finalize_model_grads``, which DeepSpeed
    replaces here; instead the weight enters through ``copy_to_tensor_model_parallel_region`` (identity
    forward, all-reduce over the TP group in backward), so the parameter receives the full gradient, the
    same on every TP rank, before any ZeRO hook reads it. One small all-reduce per norm per backward (megatron
    buckets them into one). Same parameter name (``weight``) as the norm it replaces: checkpoints and HF
    export are unchanged."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)  # fp32 like megatron's torch norm; the engine casts
        self.weight.sequence_parallel = True

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, self.normalized_shape, copy_to_tensor_model_parallel_region(self.weight),
                                            self.eps)


def swap_embedding(model, cfg) -> None:
    """Put the fused unit embedding in place of megatron's lookup (keeps the parameter, so tying holds).

    Not a change of spec: megatron-core's GPTModel builds its embedding itself, taking no spec for it, so
    the built module is re-classed here, after the build."""
    backend = cfg.model.embedding_backend
    if backend == "megatron":
        return
    emb = model.embedding.word_embeddings
    emb.__class__ = UnitVocabParallelEmbedding  # same object, same parameters; only forward changes
    emb.embedding_force = _force(backend)
    if cfg.model.language_embedding:
        # replicated across TP (megaslm.sharding: split_rule -1); initialised by megaslm.model.init_weights
        emb.lang_weight = torch.nn.Parameter(torch.empty(cfg.vocab.num_lang_ids, emb.weight.shape[1],
                                                         dtype=emb.weight.dtype, device=emb.weight.device))
        emb.add_lang = ps.get_tensor_model_parallel_rank() == 0


def _language_table_module(model) -> Optional[UnitVocabParallelEmbedding]:
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if isinstance(emb, UnitVocabParallelEmbedding) and getattr(emb, "lang_weight", None) is not None:
        return emb
    return None


def has_language_embedding(model) -> bool:
    """Whether this chunk embeds tokens with a language table (first pipeline stage only)."""
    return _language_table_module(model) is not None


@contextlib.contextmanager
def language_ids(model, lang_ids: Optional[torch.Tensor]) -> Iterator[None]:
    """Per-token language ids [b, s] for the forward calls of ``model`` (a GPTModel chunk) inside the block.

    No-op for a chunk without a language table (off, or not the first pipeline stage), whatever
    ``lang_ids`` is; with one, ``lang_ids`` must be given."""
    emb = _language_table_module(model)
    if emb is None:
        yield
        return
    if lang_ids is None:
        raise RuntimeError("model.language_embedding=true: no per-token language ids for this batch")
    emb.lang_ids = lang_ids
    try:
        yield
    finally:
        emb.lang_ids = None
