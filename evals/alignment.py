"""Hidden-state alignment of parallel utterances (e.g. EN / FR translations of one sentence).

For every decoder layer l (1..L, the output of layer l), each utterance is mean-pooled over its
tokens (no padding) to a vector; then over the N parallel pairs:

* ``cosine``: the mean cosine similarity of matched pairs (EN_i, FR_i);
* ``retrieval``: top-1 retrieval accuracy among the set, both directions averaged (EN_i's nearest FR
  by cosine is FR_i, and FR_i's nearest EN is EN_i).

Also their averages over layers. Layers live on different pipeline stages: each stage pools its own
layers (forward hooks) and the stages exchange the pooled vectors.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megaslm.config import RunConfig

from megaslm.vocab import LANG_NONE

from evals.benchmarks import Item, token_languages
from evals.engine import _ps, forward, gather_over_dp, my_buckets, pad_rows, with_progress
from evals.errors import EvalError


@torch.no_grad()
def pooled_hidden_states(chunks: List[torch.nn.Module], cfg: RunConfig, seqs: Sequence[Sequence[int]],
                         batch_size: int = 16, langs: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """[num_layers, N, hidden] float64 mean-pooled layer outputs for each token sequence (collective).
    ``langs``: per-token language ids of each sequence (needed with ``model.language_embedding``)."""
    ps = _ps()
    limit = cfg.model.max_position_embeddings or cfg.model.seq_length
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= limit:
            raise EvalError(f"utterance {i}: {len(s)} tokens (expected 1..{limit})")
    captured: Dict[int, torch.Tensor] = {}
    handles = []
    for c in chunks:
        for layer in c.decoder.layers:
            def hook(mod, inp, out, g=layer.layer_number - 1):
                captured[g] = (out[0] if isinstance(out, tuple) else out).detach()
            handles.append(layer.register_forward_hook(hook))
    local: Dict[int, Dict[int, torch.Tensor]] = {}
    try:
        for idx in with_progress("alignment", my_buckets([len(s) for s in seqs], batch_size)):
            rows = [seqs[i] for i in idx]
            toks = pad_rows(rows, cfg.vocab.pad_id)
            lang = pad_rows([langs[i] for i in idx], LANG_NONE, toks.shape[1]) if langs is not None else None
            captured.clear()
            forward(chunks, cfg, toks, None, lambda o: o[..., :1], lang)
            mask = torch.zeros(toks.shape, dtype=torch.float64)
            for k, s in enumerate(rows):
                mask[k, :len(s)] = 1.0
            for g, h in captured.items():            # h: [s, b, hidden]
                hb = h.double().cpu().transpose(0, 1)  # [b, s, hidden]
                pooled = (hb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
                for k, i in enumerate(idx):
                    local.setdefault(i, {})[g] = pooled[k]
    finally:
        for h in handles:
            h.remove()
    # stages -> everyone in the pipeline group; then data-parallel replicas
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts: List[Dict] = [None] * ps.get_pipeline_model_parallel_world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        merged: Dict[int, Dict[int, torch.Tensor]] = {}
        for p in parts:
            for i, d in p.items():
                merged.setdefault(i, {}).update(d)
        local = merged
    allv = gather_over_dp(local)
    L = cfg.model.num_layers
    return torch.stack([torch.stack([allv[i][l] for i in range(len(seqs))]) for l in range(L)])


def alignment_metrics(a: torch.Tensor, b: torch.Tensor) -> Dict[str, object]:
    """From pooled states [L, N, h] of the two languages: per-layer and average cosine / retrieval."""
    an = torch.nn.functional.normalize(a, dim=-1)
    bn = torch.nn.functional.normalize(b, dim=-1)
    sims = an @ bn.transpose(1, 2)                       # [L, N, N]
    N = a.shape[1]
    diag = sims.diagonal(dim1=1, dim2=2)                 # [L, N]
    cos = diag.mean(1)
    target = torch.arange(N)
    r_ab = (sims.argmax(2) == target).double().mean(1)
    r_ba = (sims.argmax(1) == target).double().mean(1)
    ret = (r_ab + r_ba) / 2
    return {"cosine_per_layer": cos.tolist(), "retrieval_per_layer": ret.tolist(),
            "cosine": float(cos.mean()), "retrieval": float(ret.mean()), "pairs": N}


def align_items(chunks: List[torch.nn.Module], cfg: RunConfig, items: Sequence[Item], add_bos: bool = False,
                batch_size: int = 16) -> Dict[str, object]:
    if len(items) < 2:
        raise EvalError(f"alignment needs at least 2 parallel pairs, got {len(items)}")
    head = [cfg.vocab.bos_id] if add_bos else []
    seqs = [head + cfg.vocab.encode_units(it.utterances[0]) for it in items] + \
           [head + cfg.vocab.encode_units(it.utterances[1]) for it in items]
    langs = None
    if cfg.model.language_embedding:   # each utterance in its own language (specials: none)
        own = [it.languages[0] for it in items] + [it.languages[1] for it in items]
        langs = [token_languages(cfg.vocab, s, len(s), [lang]) for s, lang in zip(seqs, own)]
    pooled = pooled_hidden_states(chunks, cfg, seqs, batch_size, langs)
    n = len(items)
    return alignment_metrics(pooled[:, :n], pooled[:, n:])
