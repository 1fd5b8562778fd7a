"""Our modules inside megatron-core's GPTModel: document-masked core attention and the fused unit embedding.

Both delegate the math to ``kernels/`` (Triton on GPU, torch reference on CPU); this file only
adapts megatron-core's calling conventions ([s, b, h, d] tensors, vocab-parallel shards, the TP
all-reduce) to the kernels' ones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule


def _force(backend: str) -> Optional[str]:
    """Config backend -> the kernels' ``force`` argument (None: Triton on GPU, reference on CPU)."""
    return {"auto": None, "triton": "triton", "reference": "reference"}[backend]


class DocumentMaskedAttention(MegatronModule):
    """Causal attention that never crosses a document (segment) boundary of a packed sequence.

    Drop-in for megatron-core's ``DotProductAttention`` in the layer spec. The per-token segment ids
    arrive through GPTModel's ``attention_mask`` argument as an integer tensor [b, s]; ``None`` means
    one segment per row (plain causal attention).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, backend: str = "auto"):
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
        self.force = _force(backend)
        # model.deterministic (megatron's deterministic_mode) selects the atomic-free, bit-reproducible backward
        self.deterministic = True if getattr(config, "deterministic_mode", False) else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from kernels.attention import segment_attention

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
        out = segment_attention(q, k, v, segments, softmax_scale=self.softmax_scale, force=self.force,
                                deterministic=self.deterministic)
        return out.transpose(0, 1).reshape(s, b, self.heads * self.head_dim)


class UnitVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron-core's vocab-parallel embedding with the lookup done by the fused unit-embedding kernel.

    Same parameter (``weight``: this rank's vocabulary shard), same all-reduce; the mask / subtract /
    gather / zero sequence is one kernel pass. Installed by ``swap_embedding``.
    """

    embedding_force: Optional[str] = None

    def forward(self, input_):
        from kernels.embedding import fused_unit_embedding

        # megatron's deterministic_mode (TransformerConfig) selects the kernel's sorted, atomic-free backward
        out = fused_unit_embedding(input_, self.weight, self.vocab_start_index,
                                   deterministic=bool(self.deterministic_mode), force=self.embedding_force)
        if self.tp_group.size() > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out


def swap_embedding(model, cfg) -> None:
    """Put the fused unit embedding in place of megatron's lookup (keeps the parameter, so tying holds)."""
    backend = cfg.model.embedding_backend
    if backend == "megatron":
        return
    emb = model.embedding.word_embeddings
    if getattr(emb, "reduce_scatter_embeddings", False):
        raise ValueError("the fused unit embedding does not support sequence parallelism")
    emb.__class__ = UnitVocabParallelEmbedding  # same object, same parameters; only forward changes
    emb.embedding_force = _force(backend)
