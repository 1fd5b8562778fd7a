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
    """Per case: config from overrides (model.init_from set), build_model + apply_init_from, logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.config_io import load_config
    from megaslm.interop.hf import apply_init_from
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
        apply_init_from(chunks, cfg)
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


def _resume_and_train(overrides, out, ckpt_dir, seeds):
    """Trainer for ``overrides`` resumed from ``ckpt_dir`` (Trainer.load), then one step per batch seed."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm.config_io import load_config
    from megaslm.train import Trainer
    from tests.workers import fixed_batch, rank_slice

    cfg = load_config(None, list(overrides) + [f"output_dir={out}", "data.demo=true", "model.init_from=null"])
    trainer = Trainer(cfg, log=lambda *_: None)
    loaded = trainer.load(ckpt_dir)
    info = {"loaded": loaded, "step": trainer.step, "tokens": trainer.tokens_seen,
            "lr": trainer.scheduler.get_last_lr()[0], "opt_lr": trainer.scheduler.optimizer.param_groups[0]["lr"]}
    losses = []
    for seed in seeds:
        losses.append(trainer.train_step(rank_slice(fixed_batch(cfg, seed=seed), trainer.dp_rank, trainer.dp_size))["loss"])
    dist.barrier()
    ps.destroy_model_parallel()
    return trainer, cfg, info, losses


def train_export_reshard(overrides: Sequence[str], work: str, tokens: List[List[int]]) -> Dict:
    """TP2xPP2 run from an HF init: 2 steps, logits, save; reshard (one process, no engine) to TP1 (ZeRO-2)
    and back to TP2xPP2; resume each and the original with Trainer.load and train 2 more steps."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.interop.hf import apply_init_from
    from megaslm.interop.reshard import reshard
    from megaslm.interop.verify import full_logits
    from megaslm.train import Trainer
    from tests.workers import fixed_batch, rank_slice

    _quiet()
    toks = torch.tensor(tokens)
    cfg = load_config(None, list(overrides) + [f"output_dir={work}/run", "data.demo=true"])
    if int(os.environ["RANK"]) == 0:
        cfg.save(f"{work}/run/config.yaml")  # as megaslm.run.run does
    trainer = Trainer(cfg, log=lambda *_: None)
    apply_init_from(trainer.chunks, cfg, trainer.engine)  # what Trainer.load does when there is nothing to resume
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

    tp1 = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.zero_stage=2", "schedule.micro_batch_size=2"]
    tp2pp2 = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1", "schedule.micro_batch_size=4"]
    if dist.get_rank() == 0:
        reshard(path_a, f"{work}/tp1", tp1)
        reshard(f"{work}/tp1", f"{work}/tp2pp2", tp2pp2)
    dist.barrier()
    path_b, path_c = f"{work}/tp1/checkpoints/step00000002", f"{work}/tp2pp2/checkpoints/step00000002"
    res = {"losses": losses, "logits_a": logits_a, "path_a": path_a, "path_b": path_b, "path_c": path_c, "lr_a": lr_a}
    # the reference: resume the original checkpoint at its own layout
    _, _, info_a, res["resume_a"] = _resume_and_train(overrides, f"{work}/resumed-a", path_a, [2, 3])
    # resume the TP1 / DP4 / ZeRO-2 reshard
    _, _, info_b, res["resume_b"] = _resume_and_train(list(overrides) + tp1, f"{work}/resumed-b", path_b, [2, 3])
    res["info_b"] = info_b
    # resume the round trip back to TP2 x PP2, with logits before training
    cfg_c = load_config(None, list(overrides) + [f"output_dir={work}/resumed", "data.demo=true",
                                                 "model.init_from=null"])
    trainer = Trainer(cfg_c, log=lambda *_: None)
    loaded = trainer.load(f"{work}/tp2pp2/checkpoints")
    logits_c = full_logits(trainer.chunks, cfg_c, toks)
    res.update({"logits_c": logits_c, "loaded": loaded, "step_c": trainer.step, "tokens_c": trainer.tokens_seen,
                "lr_c": trainer.scheduler.get_last_lr()[0],
                "opt_lr_c": trainer.scheduler.optimizer.param_groups[0]["lr"]})
    res["resume_c"] = [trainer.train_step(rank_slice(fixed_batch(cfg_c, seed=s), trainer.dp_rank, trainer.dp_size))["loss"]
                       for s in (2, 3)]
    res["loss_after_resume"] = res["resume_c"][0]
    dist.barrier()
    ps.destroy_model_parallel()
    parallel.destroy()
    return _plain(res)


def import_then_resume(overrides: Sequence[str], hf_dir: str, work: str) -> Dict:
    """import-hf (lr 1e-3, warm-up 5) -> step-0 checkpoint; a run at TP=2 with another schedule (lr 5e-3,
    constant) resumes it through select_resume + Trainer.load: its weights equal a direct HF init at TP=2
    and its first step's lr is the new schedule's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.checkpoint import select_resume
    from megaslm.config_io import load_config
    from megaslm.interop.hf import apply_init_from
    from megaslm.interop.reshard import import_hf
    from megaslm.model import build_model
    from megaslm.train import Trainer

    _quiet()
    base = list(overrides) + ["data.demo=true"]
    imp = load_config(None, base + [f"model.init_from={hf_dir}", f"output_dir={work}/imp", "optimizer.lr=1e-3",
                                    "schedule.warmup_steps=5", "parallel.tensor=2"])
    import_hf(imp, f"{work}/imp")
    cfg = load_config(None, base + [f"output_dir={work}/run", "optimizer.lr=5e-3", "schedule.warmup_steps=0",
                                    "schedule.decay=constant", "parallel.tensor=2",
                                    f"checkpoint.load={work}/imp/checkpoints"])
    resume = select_resume(cfg, dist.get_world_size())
    trainer = Trainer(cfg, log=lambda *_: None)
    loaded = trainer.load(cfg.checkpoint.load, resume=resume)
    res = {"loaded": loaded, "lr_first": trainer.scheduler.optimizer.param_groups[0]["lr"],
           "resumed": sharding.gather_full_state_dict(trainer.chunks, cfg)}
    dist.barrier()
    ps.destroy_model_parallel()
    del trainer
    direct_cfg = load_config(None, base + [f"model.init_from={hf_dir}", "parallel.tensor=2"])
    parallel.initialize(direct_cfg)
    chunks = build_model(direct_cfg)
    apply_init_from(chunks, direct_cfg)
    res["direct"] = sharding.gather_full_state_dict(chunks, direct_cfg)
    dist.barrier()
    ps.destroy_model_parallel()
    parallel.destroy()
    return _plain(res)


def import_and_sample(overrides: Sequence[str], work: str, prompt: List[int], max_new: int) -> Dict:
    """import-hf -> a step-0 checkpoint in ``work`` (no training), then the units launchers/sample.py's
    library function continues ``prompt`` with, greedily."""
    from megatron.core import parallel_state as ps

    from megaslm import parallel
    from megaslm.config_io import load_config
    from megaslm.interop.reshard import import_hf
    from evals.engine import load_checkpoint_model
    from evals.generate import sample

    _quiet()
    ckpt = import_hf(load_config(None, list(overrides) + ["data.demo=true", f"output_dir={work}"]), work)
    cfg, chunks = load_checkpoint_model(ckpt)
    units = sample(chunks, cfg, prompt, max_new_units=max_new, temperature=0.0)
    ps.destroy_model_parallel()
    parallel.destroy()
    return {"checkpoint": ckpt, "units": units}
