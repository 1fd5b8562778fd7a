"""Rank functions for tests/test_memory_plan.py: count what megaslm's real model saves for backward.

One micro-batch forward (and the trainer's loss) under ``torch.autograd.graph.saved_tensors_hooks``: every
saved tensor's storage is counted once (by ``untyped_storage().data_ptr()``), parameters' own storages are
not counted, and each storage's size is read at the END of the forward (a storage megatron frees early,
e.g. a discarded checkpoint output, counts what it still holds then)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# 4 layers, hidden 64, 4 heads / 2 KV groups (head dim 16), SwiGLU 176, vocab 256 rows, seq 64, micro-batch 2
BASE = ["model.num_layers=4", "model.seq_length=64", "schedule.micro_batch_size=2", "schedule.global_batch_size=2",
        "output_dir=/tmp/megaslm-memory-test"]


def _count(model, run_forward, extra=()):
    """(bytes saved for backward by ``run_forward()``, its output)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, object] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in params and ptr not in seen:
            seen[ptr] = st
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    for t in extra(out) if callable(extra) else extra:
        pack(t)
    counted = sum(st.nbytes() for st in seen.values())
    seen.clear()
    return counted, out


def count_cases(cases: Sequence[Sequence[str]]) -> List[Dict]:
    """For each override list: the saved bytes of one micro-batch (PP = 1: the whole model and the loss;
    PP = 2: this rank's stage, with the stage output the schedule keeps on the first) and the rank's
    parameter count."""
    import torch
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.model import build_model, num_parameters, resolve_attention
    from tests.workers import fixed_batch

    results = []
    for overrides in cases:
        cfg = load_config(TINY, BASE + list(overrides))
        parallel.initialize(cfg)
        torch.set_num_threads(1)
        [model] = build_model(cfg)
        model.train()
        batch = fixed_batch(cfg, seed=1)
        first, last = model.pre_process, model.post_process
        if not first:
            S, B, h = cfg.model.seq_length, cfg.schedule.micro_batch_size, cfg.model.hidden_size
            sp = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
            x = torch.randn(S // sp, B, h, requires_grad=True)   # what the previous stage would send
            model.set_input_tensor(x)

        def forward():
            out = model(batch.tokens if first else None, batch.position_ids, attention_mask=batch.segment_ids,
                        labels=batch.labels if last else None)
            return (out.float() * batch.loss_mask).sum() if last else out

        # a non-last stage's output is kept by the pipeline schedule until its backward: count it too
        counted, out = _count(model, forward, extra=(lambda o: [] if last else [o]))
        (out if last else out.sum()).backward()   # the graph was real: it runs backward
        results.append({"overrides": list(overrides), "counted": counted, "first": first, "last": last,
                        "params": num_parameters([model]), "attention": resolve_attention(cfg, quiet=True)[0],
                        "pp_rank": ps.get_pipeline_model_parallel_rank()})
        ps.destroy_model_parallel()
        del model
    parallel.destroy()
    return results
