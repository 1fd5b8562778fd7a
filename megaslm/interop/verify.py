"""Full-vocabulary logits of our (sharded) model on one token batch, for checks against Hugging Face.

Collective over the model-parallel ranks. One document per row (segment ids 0, positions 0..s-1),
causal: the same function as an HF causal LM without padding.
"""
from __future__ import annotations

from typing import List, Optional

import torch


@torch.no_grad()
def full_logits(chunks: List[torch.nn.Module], cfg, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """[b, s, V_padded] fp32 logits on the last pipeline stage's ranks (gathered across TP); None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s).contiguous()
    seg = torch.zeros(b, s, dtype=torch.int32, device=device)
    for c in chunks:
        c.eval()
    captured: List[torch.Tensor] = []
    if cfg.parallel.pipeline == 1:
        out = chunks[0](tokens, pos, attention_mask=seg, labels=None)
        captured.append(out)
    else:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def loss_func(output):
            captured.append(output.detach())
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        def forward_step(data_iterator, model):
            next(data_iterator)
            return model(tokens, pos, attention_mask=seg, labels=None), loss_func

        iters = [iter([None]) for _ in chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
        )
    for c in chunks:
        c.train()
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = captured[-1].float()
    if local.shape[0] != b:  # megatron returns [s, b, V] when labels are None in some versions
        local = local.transpose(0, 1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    return local.cpu()
