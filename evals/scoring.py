"""Pairwise benchmarks (sSC, sTC, sBLIMP, sWUGGY): which candidate does the model find likelier?

Conventions (docs/evals.md). An utterance is ``[bos] + context + candidate`` as token ids (bos only
with ``eval.add_bos``; the default data has none); log-probabilities are those of tokens 1..n-1 given
their prefix (the first token is conditioning only, as in training where a document's first unit
is never predicted).

* ``mean`` (default, the slamkit convention): mean of the log-probabilities of every predicted
  token of the whole utterance (context and candidate).
* ``sum_continuation``: sum of the log-probabilities of the candidate's tokens only, given the
  context (for a context-free item without bos, the candidate's first token is not predicted).
* ``mean_continuation``: the mean of those same candidate-token log-probabilities (the ending only,
  length-normalised; a common choice in the literature for endings of different lengths).

An item is right when the correct candidate scores strictly highest; a tie at the top counts
1 / (number tied) (one half for a pair).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megaslm.config import RunConfig

from evals.benchmarks import Item, encode, token_languages
from evals.engine import sequence_logprobs
from evals.errors import EvalError

SCORINGS = ("mean", "sum_continuation", "mean_continuation")


def utterance_score(lp: Sequence[float], start: int, scoring: str) -> float:
    """Score from per-token log-probs ``lp`` (lp[t-1] = log p(tok[t] | tok[:t])), candidate at ``start``."""
    if scoring == "mean":
        return float(sum(lp) / len(lp))
    if scoring == "sum_continuation":
        return float(sum(lp[max(start, 1) - 1:]))
    if scoring == "mean_continuation":
        ending = lp[max(start, 1) - 1:]
        return float(sum(ending) / len(ending))
    raise EvalError(f"scoring: {scoring!r} is not one of {SCORINGS}")


def item_credit(scores: Sequence[float], correct: int) -> float:
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    return (1.0 / len(tied)) if correct in tied else 0.0


def score_items(chunks: List[torch.nn.Module], cfg: RunConfig, items: Sequence[Item], scoring: str = "mean",
                add_bos: bool = False, batch_size: int = 16) -> List[Dict]:
    """Per-item records ``{id, task, scores, correct, credit, ...}`` for the pairwise items (collective)."""
    if scoring not in SCORINGS:
        raise EvalError(f"scoring: {scoring!r} is not one of {SCORINGS}")
    seqs, starts, owner, langs = [], [], [], []
    limit = cfg.model.max_position_embeddings or cfg.model.seq_length
    for n, it in enumerate(items):
        for k, cand in enumerate(it.candidates):
            toks, start = encode(cfg.vocab, it.context, cand, add_bos)
            if len(toks) > limit:
                raise EvalError(f"{it.where}: candidates[{k}]: {len(toks)} tokens exceed the model's {limit} positions")
            if len(toks) < 2 or start >= len(toks):
                raise EvalError(f"{it.where}: candidates[{k}]: nothing to score ({len(toks)} tokens, candidate "
                                f"empty after encoding)")
            seqs.append(toks)
            langs.append(token_languages(cfg.vocab, toks, start, it.languages))
            starts.append(start)
            owner.append((n, k))
    # per-token language ids feed the model's language embedding (model.language_embedding); unused without
    lps = sequence_logprobs(chunks, cfg, seqs, batch_size,
                            langs if cfg.model.language_embedding else None) if seqs else []
    per: List[Dict] = []
    for n, it in enumerate(items):
        per.append({"id": it.id, "task": it.task, "benchmark": it.benchmark, "languages": list(it.languages),
                    "correct": it.correct, "scores": [], "logprob_sum": [], "num_tokens": []})
    for (n, k), lp, st in zip(owner, lps, starts):
        rec = per[n]
        rec["scores"].append(utterance_score(lp, st, scoring))
        rec["logprob_sum"].append(float(sum(lp)))
        rec["num_tokens"].append(len(lp))
    for rec in per:
        rec["credit"] = item_credit(rec["scores"], rec["correct"])
        rec["scoring"] = scoring
    return per


def accuracies(per_item: Sequence[Dict]) -> Dict[str, Dict]:
    """Per task: accuracy (mean credit, in [0, 1]), item count and chance (the expected accuracy of a random
    pick: the mean of 1/candidates over the items; 0.5 for pairs)."""
    out: Dict[str, Dict] = {}
    for rec in per_item:
        t = out.setdefault(rec["task"], {"credit": 0.0, "items": 0, "chance": 0.0})
        t["credit"] += rec["credit"]
        t["items"] += 1
        t["chance"] += 1.0 / len(rec["scores"])
    return {k: {"accuracy": v["credit"] / v["items"], "items": v["items"], "chance": v["chance"] / v["items"]}
            for k, v in out.items()}
