"""Functions run inside spawned gloo ranks by tests/interop (importable by module path)."""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _quiet():
    torch.set_num_threads(1)


def _plain(x):
    """Tensors -> numpy: tensors through the result queue travel as shared-memory fds that die with the rank."""
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def import_forward(cases: List[Dict], tokens: List[List[int]]) -> List[Dict]:
    """Per case: config from overrides (model.init_from set), build_model (the init_from hook), logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.config import load_config
    from megaslm.interop.verify import full_logits
    from megaslm.model import build_model

    _quiet()
    toks = torch.tensor(tokens)
    out = []
    for case in cases:
        cfg = load_config(None, list(case["overrides"]) + ["data.demo=true", "schedule.micro_batch_size=1",
                                                          "schedule.global_batch_size=8"])
        parallel.initialize(cfg)
        chunks = build_model(cfg)
        res = {"name": case["name"], "padded_vocab": cfg.padded_vocab_size()}
        if case.get("logits"):
            res["logits"] = full_logits(chunks, cfg, toks)
        if case.get("gather"):
            full = sharding.gather_full_state_dict(chunks, cfg)
            res["shapes"] = {k: tuple(v.shape) for k, v in full.items()}
            keep = ("embedding.word_embeddings.weight", "output_layer.weight",
                    "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_qkv.bias",
                    "decoder.layers.1.mlp.linear_fc1.weight")
            res["tensors"] = {k: v for k, v in full.items() if k in keep}
        out.append(res)
        dist.barrier()
        ps.destroy_model_parallel()
    parallel.destroy()
    return _plain(out)


def train_export_reshard(overrides: Sequence[str], work: str, tokens: List[List[int]]) -> Dict:
    """TP2xPP2 run from an HF init: 2 steps, logits, save; reshard to TP1 (ZeRO-2) and back to TP2xPP2;
    resume the result with Trainer.load, check logits/counters, train one more step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.config import load_config
    from megaslm.interop.reshard import reshard
    from megaslm.interop.verify import full_logits
    from megaslm.train import Trainer
    from tests.workers import fixed_batch, rank_slice

    _quiet()
    toks = torch.tensor(tokens)
    cfg = load_config(None, list(overrides) + [f"output_dir={work}/run", "data.demo=true"])
    if int(os.environ["RANK"]) == 0:
        cfg.save(f"{work}/run/config.yaml")  # as megaslm.train.run does
    trainer = Trainer(cfg, log=lambda *_: None)
    losses = []
    for seed in range(2):
        batch = fixed_batch(cfg, seed=seed)
        losses.append(trainer.train_step(rank_slice(batch, trainer.dp_rank, trainer.dp_size))["loss"])
        trainer.step += 1
        trainer.stage_step += 1
        trainer.tokens_seen += cfg.tokens_per_step
    logits_a = full_logits(trainer.chunks, cfg, toks)
    lr_a = trainer.scheduler.get_last_lr()[0]
    path_a = trainer.save()
    dist.barrier()
    ps.destroy_model_parallel()
    del trainer

    path_b = reshard(path_a, f"{work}/tp1", ["parallel.tensor=1", "parallel.pipeline=1", "parallel.zero_stage=2",
                                             "schedule.micro_batch_size=2"])
    path_c = reshard(path_b, f"{work}/tp2pp2", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1",
                                                "schedule.micro_batch_size=4"])
    # resume from the round-tripped checkpoint
    cfg_c = load_config(None, list(overrides) + [f"output_dir={work}/resumed", "data.demo=true",
                                                 "model.init_from=null"])
    trainer = Trainer(cfg_c, log=lambda *_: None)
    loaded = trainer.load(f"{work}/tp2pp2/checkpoints")
    logits_c = full_logits(trainer.chunks, cfg_c, toks)
    res = {"losses": losses, "logits_a": logits_a, "logits_c": logits_c, "path_a": path_a, "path_b": path_b,
           "path_c": path_c, "loaded": loaded, "step_c": trainer.step, "tokens_c": trainer.tokens_seen,
           "lr_a": lr_a, "lr_c": trainer.scheduler.get_last_lr()[0],
           "opt_lr_c": trainer.scheduler.optimizer.param_groups[0]["lr"]}
    out = trainer.train_step(rank_slice(fixed_batch(cfg_c, seed=2), trainer.dp_rank, trainer.dp_size))
    res["loss_after_resume"] = out["loss"]
    dist.barrier()
    ps.destroy_model_parallel()
    parallel.destroy()
    return _plain(res)
