"""The sharded model for evaluation: load weights at any layout, run forwards through TP/PP/DP.

Everything here is collective: every rank of the world calls each function with the same arguments.
Layout: TP and PP groups come from ``megaslm.parallel.initialize``; the data-parallel replicas split
the work (length buckets round-robin) and exchange results at the end, so every rank returns the
same answer.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megaslm import parallel, sharding
from megaslm.checkpoint.reader import Checkpoint
from megaslm.config import RunConfig
from megaslm.model import build_model
from megaslm.vocab import LANG_NONE

from evals import preflight
from evals.errors import EvalError


# ------------------------------------------------------------------------------------------------
# Config and weights
# ------------------------------------------------------------------------------------------------
def eval_config(saved: RunConfig, overrides: Sequence[str] = (), world_size: Optional[int] = None) -> RunConfig:
    """The saved run config with the eval layout (``evals.preflight.eval_config``, which the launcher runs
    before torch is imported), here for this machine: fp32 without CUDA."""
    return preflight.eval_config(saved, overrides, world_size, cuda=torch.cuda.is_available())


def build_eval_model(cfg: RunConfig, full: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.nn.Module]:
    """Initialise the process groups for ``cfg``, build its chunks and load ``full`` (canonical names)."""
    parallel.initialize(cfg)
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads_per_rank(dist.get_world_size()))
    chunks = build_model(cfg, init=full is None)
    if full is not None:
        try:
            sharding.load_full_state_dict(chunks, cfg, full, strict=True)
        except (KeyError, ValueError) as e:
            raise EvalError(f"checkpoint does not fit the model its config describes: {e}") from None
    for c in chunks:
        c.eval()
    return chunks


def load_checkpoint_model(ckpt: str, overrides: Sequence[str] = ()) -> Tuple[RunConfig, List[torch.nn.Module]]:
    """A checkpoint written at any layout (its saved config, canonical full weights) built at the eval layout."""
    ck = Checkpoint(ckpt)
    cfg = eval_config(ck.cfg, overrides)
    return cfg, build_eval_model(cfg, ck.state_dict())


# ------------------------------------------------------------------------------------------------
# One forward through the pipeline
# ------------------------------------------------------------------------------------------------
def _ps():
    from megatron.core import parallel_state as ps

    return ps


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def forward(chunks: List[torch.nn.Module], cfg: RunConfig, tokens: torch.Tensor,
            labels: Optional[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
            lang_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Run ``tokens`` [b, s] (one document per row, right-padded) through the chunks.

    On the last pipeline stage returns ``fn(output)`` where output is the per-token cross-entropy
    [b, s] (labels given; vocab-parallel, no full-logit gather) or the vocab-parallel logits
    [b, s, V/tp]; ``None`` on the other stages. ``lang_ids`` [b, s]: the per-token language ids,
    required when the model has a language embedding (``model.language_embedding``), ignored otherwise.
    """
    from megaslm.layers import language_ids

    if cfg.model.language_embedding and lang_ids is None:
        raise EvalError("model.language_embedding=true: this forward needs per-token language ids")
    if not cfg.model.language_embedding:
        lang_ids = None
    dev = _device()
    b, s = tokens.shape
    tokens = tokens.to(dev)
    labels = labels.to(dev) if labels is not None else None
    lang_ids = lang_ids.to(dev) if lang_ids is not None else None
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s).contiguous()
    seg = torch.zeros(b, s, dtype=torch.int32, device=dev)
    if cfg.parallel.pipeline == 1:
        with language_ids(chunks[0], lang_ids):
            return fn(chunks[0](tokens, pos, attention_mask=seg, labels=labels))
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out: List[torch.Tensor] = []

    def loss_func(output):
        out.append(fn(output))
        return output.float().sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    def step(data_iterator, model):
        next(data_iterator)
        with language_ids(model, lang_ids):   # a no-op past the first stage
            return model(tokens, pos, attention_mask=seg, labels=labels), loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=chunks[0],
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return out[0] if out else None


def broadcast_from_last_stage(t: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=dtype, device=_device())
    t = t.to(dtype).contiguous()
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def gather_over_dp(local: Dict) -> Dict:
    """Union of per-rank dicts over the data-parallel group (every DP rank gets the whole)."""
    ps = _ps()
    n = ps.get_data_parallel_world_size()
    if n == 1:
        return local
    parts: List[Dict] = [None] * n  # type: ignore[list-item]
    dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    out: Dict = {}
    for p in parts:
        out.update(p)
    return out


def buckets(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped by length (sorted, then cut into batches of ``batch_size``)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def with_progress(what: str, mine: Sequence[List[int]]):
    """This rank's buckets of a pass, one by one, their progress shown by global rank 0 (``megaslm.progress``)."""
    from megaslm.progress import Progress
    return Progress(f"eval {what}", total=sum(len(b) for b in mine), unit="sequences",
                    enabled=not dist.is_initialized() or dist.get_rank() == 0).iterate(mine, len)


def my_buckets(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    ps = _ps()
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [b for j, b in enumerate(buckets(lengths, batch_size)) if j % dp == r]


def pad_rows(seqs: Sequence[Sequence[int]], pad: int, length: Optional[int] = None) -> torch.Tensor:
    L = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------
# Per-token log-likelihoods
# ------------------------------------------------------------------------------------------------
def sequence_logprobs(chunks: List[torch.nn.Module], cfg: RunConfig, seqs: Sequence[Sequence[int]],
                      batch_size: int = 16, langs: Optional[Sequence[Sequence[int]]] = None) -> List[List[float]]:
    """For each token sequence, ``log p(seq[t] | seq[:t])`` for t = 1..len-1 (float64 values).

    Computed as minus the model's vocab-parallel cross-entropy with ``labels`` = next tokens (the
    same fused path as training: no rank ever holds the full logits). Collective; every rank
    returns the full list. ``langs``: per-token language ids of each sequence (needed with
    ``model.language_embedding``; see ``evals.benchmarks.token_languages``).
    """
    limit = cfg.model.max_position_embeddings or cfg.model.seq_length
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise EvalError(f"sequence {i}: needs at least 2 tokens to score, got {len(s)}")
        if len(s) > limit:
            raise EvalError(f"sequence {i}: {len(s)} tokens exceed the model's {limit} positions")
    if langs is not None and [len(l) for l in langs] != [len(s) for s in seqs]:
        raise EvalError("language ids: one id per token of every sequence expected")
    pad = cfg.vocab.pad_id
    local: Dict[int, List[float]] = {}
    for idx in with_progress("scoring", my_buckets([len(s) for s in seqs], batch_size)):
        rows = [seqs[i] for i in idx]
        toks = pad_rows(rows, pad)
        labels = torch.full_like(toks, pad)
        labels[:, :-1] = toks[:, 1:]
        lang = pad_rows([langs[i] for i in idx], LANG_NONE, toks.shape[1]) if langs is not None else None
        res = forward(chunks, cfg, toks, labels, lambda ce: -ce.double(), lang)
        res = broadcast_from_last_stage(res, tuple(toks.shape), torch.float64).cpu()
        for k, i in enumerate(idx):
            local[i] = res[k, :len(seqs[i]) - 1].tolist()
    allv = gather_over_dp(local)
    return [allv[i] for i in range(len(seqs))]
