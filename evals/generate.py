"""Continuation: sample units after a prompt through the sharded model.

No KV cache (the full prefix is re-run each step; fine at evaluation sizes). The last stage gathers
the last position's vocab-parallel logits across TP (for sampling only), masks special tokens and the
TP padding rows (eod is allowed and ends the continuation when ``stop_at_eod``), and samples with a
generator seeded identically on every rank, so all TP ranks draw the same token; the token then goes
to the other pipeline stages.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megaslm.config import RunConfig
from megaslm.vocab import LANG_NONE, VocabError

from evals.engine import _device, _ps, forward
from evals.errors import EvalError


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V] logits -> probabilities after temperature, top-k and nucleus filtering (greedy when temperature == 0)."""
    if temperature <= 0:
        out = torch.zeros_like(logits)
        out[int(torch.argmax(logits))] = 1.0
        return out
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p          # smallest prefix whose mass reaches top_p
        keep[0] = True
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[si[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


@torch.no_grad()
def sample(chunks: List[torch.nn.Module], cfg: RunConfig, prompt_units: Sequence[int], max_new_units: int = 32,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           add_bos: bool = False, stop_at_eod: bool = True, language: Optional[str] = None) -> List[int]:
    """Units sampled after ``prompt_units`` (raw unit ids). Collective; every rank returns the same list.

    ``language``: the prompt's language, required for a model with a language embedding
    (``model.language_embedding``): prompt and sampled units carry it, specials none."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    ps = _ps()
    v = cfg.vocab
    toks = ([v.bos_id] if add_bos else []) + v.encode_units(prompt_units)
    if not toks:
        raise EvalError("sample: empty prompt (give at least one unit, or add_bos)")
    if cfg.model.language_embedding and language is None:
        raise EvalError("sample: the model has a language embedding (model.language_embedding=true): give the "
                        "prompt's language (--language)")
    lang_id = None
    if cfg.model.language_embedding:
        try:
            lang_id = v.lang_id(language)
        except VocabError as e:
            raise EvalError(f"--language: {e}") from None
    limit = cfg.model.max_position_embeddings or cfg.model.seq_length
    gen = torch.Generator().manual_seed(int(seed))
    out: List[int] = []
    for _ in range(max_new_units):
        if len(toks) >= limit:
            break
        x = torch.tensor([toks], dtype=torch.long)

        def pick(logits):  # last stage: [1, s, V/tp] -> chosen token id (as a 1-element tensor)
            full = gather_from_tensor_model_parallel_region(logits[:, -1:, :].float())[0, 0].double().cpu()
            allowed = torch.zeros_like(full, dtype=torch.bool)
            allowed[v.offset:v.size] = True
            if stop_at_eod:
                allowed[v.eod_id] = True
            full = torch.where(allowed, full, torch.full_like(full, float("-inf")))
            probs = filter_logits(full, temperature, top_k, top_p)
            return torch.multinomial(probs, 1, generator=gen).to(torch.long)

        lang = None
        if lang_id is not None:
            lang = torch.tensor([[LANG_NONE if t < v.offset else lang_id for t in toks]], dtype=torch.long)
        tok = forward(chunks, cfg, x, None, pick, lang)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            t = tok.to(_device()) if tok is not None else torch.zeros(1, dtype=torch.long, device=_device())
            dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
            tok = t.cpu()
        t = int(tok.item())
        if t == v.eod_id:
            break
        toks.append(t)
        out.append(t - v.offset)
    return out
