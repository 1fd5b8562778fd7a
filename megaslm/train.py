"""The training loop: megatron-core model under a DeepSpeed engine (ZeRO 0-3).

Who owns what:
  * DeepSpeed owns the optimizer (AdamW, ZeRO partitioning, gradient clipping, bf16 master weights),
    the LR scheduler stepping and checkpoint files. It runs with ``managed_gradient_accumulation:
    false``: we drive the micro-batches, ``engine.step()`` is the accumulation boundary.
  * With PP=1 each micro-batch is ``engine(...)`` then ``engine.backward(loss)`` (every ZeRO stage).
  * With PP>1 megatron-core's schedules own forward/backward (1F1B, interleaved with VPP); DeepSpeed
    sees the raw chunks only through the optimizer (ZeRO-0/1; ZeRO-2/3 are refused by the config).

The loss is the mean over every loss-bearing token of the global batch, whatever the layout: each
micro-batch contributes ``sum(token losses) * dp / T`` with ``T`` the global token count, and
DeepSpeed's data-parallel gradient averaging divides the ``dp`` back out. So TP, PP, DP and ZeRO
layouts reproduce the single-process losses.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megaslm import parallel
from megaslm.config import RunConfig
from megaslm.data import Batch, build_stage_dataset, load_step
from megaslm.model import build_model, num_parameters


# ------------------------------------------------------------------------------------------------
# DeepSpeed pieces
# ------------------------------------------------------------------------------------------------
def deepspeed_config(cfg: RunConfig, dp_size: int, cuda: bool) -> Dict:
    precision = cfg.resolved_precision(cuda)
    per_rank = cfg.schedule.global_batch_size // dp_size
    ds = {
        "train_batch_size": cfg.schedule.global_batch_size,
        "train_micro_batch_size_per_gpu": per_rank,  # one engine step sees all of this rank's samples
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def param_groups(chunks: List[torch.nn.Module], weight_decay: float):
    """Weight decay on matrices; none on norms, biases (megatron's convention)."""
    decay, no_decay, seen = [], [], set()
    for c in chunks:
        for name, p in c.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if (p.dim() == 1 or name.endswith(".bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    s = cfg.schedule
    warm = s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_fraction * total_steps))
    floor = cfg.optimizer.min_lr / cfg.optimizer.lr
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if s.decay == "constant":
        return 1.0
    span = max(1, total_steps - warm)
    frac = min(1.0, (step - warm) / span)
    if s.decay == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig, log=print):
        import deepspeed
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.cuda = torch.cuda.is_available()
        self.layout = parallel.initialize(cfg)
        self.ps = ps
        self.rank = dist.get_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp = cfg.parallel.pipeline
        self._log = log
        if not self.cuda:
            # one compute thread per rank on a shared CPU, else ranks thrash each other
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))

        self.chunks = build_model(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        for c in self.chunks:
            for p in c.parameters():
                if getattr(p, "shared", False) and self.pp > 1:
                    # the last stage's copy of the tied embedding: counted once in the grad norm
                    p.ds_pipe_replicated = True

        self.total_steps = cfg.total_steps()
        groups = param_groups(self.chunks, cfg.optimizer.weight_decay)
        opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                                eps=cfg.optimizer.eps, fused=self.cuda or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_lambda, cfg=cfg, total_steps=self.total_steps))
        module = self.chunks[0] if len(self.chunks) == 1 and self.pp == 1 else torch.nn.ModuleList(self.chunks)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, mpu=parallel.DeepSpeedMpu(),
            config=deepspeed_config(cfg, self.dp_size, self.cuda), dist_init_required=False,
        )
        if self.pp > 1:
            self._setup_pipeline_hooks()
        self.step = 0                      # optimizer steps done
        self.tokens_seen = 0               # loss-bearing + context tokens consumed (global)
        self.stage_index = 0
        self.stage_step = 0
        self.history: List[Dict] = []
        self._datasets: Dict[int, object] = {}

    # ---- logging ------------------------------------------------------------------------
    def is_logger(self) -> bool:
        return self.rank == dist.get_world_size() - 1 if self.pp > 1 else self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_logger():
            self._log(msg)

    # ---- pipeline plumbing --------------------------------------------------------------
    def _setup_pipeline_hooks(self) -> None:
        ps = self.ps
        for c in self.chunks:
            c.config.grad_scale_func = None
            c.config.no_sync_func = None
            c.config.grad_sync_func = None
            c.config.param_sync_func = None
            c.config.finalize_model_grads_func = self._finalize_pipeline_grads

    def _finalize_pipeline_grads(self, model, num_tokens=None, **kwargs) -> None:
        """Sum the tied embedding / output-layer gradient across the first and last stage."""
        if not self.cfg.model.tie_embeddings:
            return
        ps = self.ps
        if not ps.is_rank_in_embedding_group(ignore_virtual=True):
            return
        first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
        chunk = model[0] if first_stage else model[-1]
        if first_stage and not chunk.pre_process:
            return
        weight = chunk.shared_embedding_or_output_weight()
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        dist.all_reduce(grad, group=ps.get_embedding_group())
        weight.grad = grad

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, batch: Batch) -> Dict[str, float]:
        """Forward/backward over this rank's share of the global batch, then the optimizer step."""
        cfg = self.cfg
        micro = batch.split(batch.num_sequences // cfg.schedule.micro_batch_size)
        local_tokens = batch.loss_mask.sum()
        total = local_tokens.clone().to(self.device)
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        T = float(total.item())
        scale = self.dp_size / max(T, 1.0)
        lsum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.pp == 1:
            for mb in micro:
                mb = mb.to(self.device)
                out = self.engine(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
                tok = (out.float() * mb.loss_mask).sum()
                self.engine.backward(tok * scale, scale_wrt_gas=False)
                lsum += tok.detach().double()
        else:
            lsum = self._pipeline_forward_backward(micro, scale)
        self.engine.step()
        # the step's loss: mean over all loss tokens of the global batch
        dist.all_reduce(lsum, group=self.ps.get_data_parallel_group())
        if self.pp > 1:
            # only the last stage has the loss: share it along the pipeline
            src = self.ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(lsum, src=src, group=self.ps.get_pipeline_model_parallel_group())
        loss = float(lsum.item()) / max(T, 1.0)
        gn = self.engine.get_global_grad_norm()
        gn = float(gn.item() if torch.is_tensor(gn) else (gn if gn is not None else float("nan")))
        return {"loss": loss, "grad_norm": gn, "loss_tokens": T}

    def _pipeline_forward_backward(self, micro: List[Batch], scale: float) -> torch.Tensor:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = self.device
        collected: List[torch.Tensor] = []

        def loss_func(mask, output):
            tok = (output.float() * mask).sum()
            collected.append(tok.detach().double())
            return tok * scale, mask.sum().to(torch.int), {"tok": tok.detach()}

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(device)
            out = model(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
            return out, partial(loss_func, mb.loss_mask)

        iters = [iter(micro) for _ in self.chunks]
        fb = get_forward_backward_func()
        fb(
            forward_step_func=forward_step,
            data_iterator=iters if len(self.chunks) > 1 else iters[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=False,
        )
        return torch.stack(collected).sum() if collected else torch.zeros((), dtype=torch.float64, device=device)

    # ---- data ---------------------------------------------------------------------------
    def stage_dataset(self, index: int):
        if index not in self._datasets:
            stage = self.cfg.schedule.stages[index]
            steps = self.cfg.stage_steps()[index]
            self._datasets[index] = build_stage_dataset(self.cfg, stage, steps * self.cfg.schedule.global_batch_size,
                                                        seed_offset=index)
        return self._datasets[index]

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoint_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def save(self) -> str:
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "stage_index": self.stage_index,
                  "stage_step": self.stage_step, "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(self.checkpoint_dir(), tag=tag, client_state=client)
        dist.barrier()
        if self.rank == 0:
            self._prune_checkpoints()
        dist.barrier()
        return os.path.join(self.checkpoint_dir(), tag)

    def _prune_checkpoints(self) -> None:
        d = self.checkpoint_dir()
        tags = sorted(t for t in os.listdir(d) if t.startswith("step") and os.path.isdir(os.path.join(d, t)))
        for t in tags[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(d, t), ignore_errors=True)

    def load(self, directory: Optional[str] = None) -> bool:
        d = directory or self.checkpoint_dir()
        if not os.path.exists(os.path.join(d, "latest")):
            return False
        path, client = self.engine.load_checkpoint(d)
        if path is None:
            return False
        self.step = client["step"]
        self.tokens_seen = client["tokens_seen"]
        self.stage_index = client["stage_index"]
        self.stage_step = client["stage_step"]
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, max_steps: Optional[int] = None) -> List[Dict]:
        cfg = self.cfg
        stage_steps = cfg.stage_steps()
        tokens_per_step = cfg.tokens_per_step
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        metrics = open(metrics_path, "a") if (self.is_logger() and cfg.logging.jsonl) else None
        self.log(f"model: {num_parameters(self.chunks):,} parameters on this rank; layout TP={self.layout.tensor} "
                 f"PP={self.layout.pipeline} DP={self.layout.data} ZeRO-{cfg.parallel.zero_stage}; "
                 f"{self.total_steps} steps x {tokens_per_step:,} tokens")
        t_last = time.time()
        done = 0
        try:
            while self.stage_index < len(stage_steps):
                if self.stage_step >= stage_steps[self.stage_index]:
                    self.stage_index += 1
                    self.stage_step = 0
                    continue
                if max_steps is not None and done >= max_steps:
                    break
                ds = self.stage_dataset(self.stage_index)
                batch = load_step(ds, cfg, self.stage_step, self.dp_rank, self.dp_size)
                out = self.train_step(batch)
                self.step += 1
                self.stage_step += 1
                done += 1
                self.tokens_seen += tokens_per_step
                now = time.time()
                rec = {"step": self.step, "stage": cfg.schedule.stages[self.stage_index].name,
                       "loss": out["loss"], "lr": self.scheduler.get_last_lr()[0], "grad_norm": out["grad_norm"],
                       "tokens_seen": self.tokens_seen, "tokens_per_s": tokens_per_step / max(now - t_last, 1e-9),
                       "step_time_s": now - t_last}
                t_last = now
                self.history.append(rec)
                if metrics is not None:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if self.step % cfg.logging.interval == 0 or self.step == 1 or self.step == self.total_steps:
                    self.log(f"step {self.step:6d} | {rec['stage']} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                             f"grad norm {rec['grad_norm']:.3f} | tokens {self.tokens_seen:,} | "
                             f"{rec['tokens_per_s']:,.0f} tok/s")
                if cfg.checkpoint.save and cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.log(f"saved {self.save()}")
        finally:
            if metrics is not None:
                metrics.close()
        return self.history


def run(cfg: RunConfig, log=print, max_steps: Optional[int] = None) -> List[Dict]:
    """Train ``cfg`` end to end (used by launchers/pretrain.py): resume, fit, final checkpoint."""
    world = parallel.env_world()
    cfg.validate(world_size=world["world_size"], cuda=torch.cuda.is_available())
    if world["rank"] == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if cfg.data.demo:
            prepare_demo_data(cfg, log)
    parallel.init_distributed()
    dist.barrier()
    if cfg.data.demo:
        attach_demo_data(cfg)
    if world["rank"] == 0:
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
    trainer = Trainer(cfg, log=log)
    trainer.load(cfg.checkpoint.load)
    history = trainer.fit(max_steps=max_steps)
    if cfg.checkpoint.save and history:
        trainer.log(f"saved {trainer.save()}")
    return history


def demo_data_dir(cfg: RunConfig) -> str:
    return os.path.join(cfg.output_dir, "data")


def prepare_demo_data(cfg: RunConfig, log=print) -> None:
    """Build the synthetic EN/FR corpus with data_tools' real pipeline (rank 0, once)."""
    from data_tools.synthetic import write_demo_corpus

    d = demo_data_dir(cfg)
    if os.path.exists(os.path.join(d, "prefixes.json")):
        return
    prefixes = write_demo_corpus(d, seed=cfg.data.seed, num_stories=cfg.data.demo_stories,
                                 codebook_size=cfg.vocab.codebook_size)
    tmp = os.path.join(d, f"prefixes.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(prefixes, f)
    os.replace(tmp, os.path.join(d, "prefixes.json"))
    log(f"built the demo corpus in {d}: {', '.join(sorted(prefixes))}")


def attach_demo_data(cfg: RunConfig) -> None:
    """Stages without data train on the demo corpus's interleaved EN/FR stream."""
    from megaslm.config import DataSource

    with open(os.path.join(demo_data_dir(cfg), "prefixes.json")) as f:
        prefixes = json.load(f)
    for st in cfg.schedule.stages:
        if not st.data:
            st.data = [DataSource(path=prefixes["enfr_interleaved"], weight=1.0)]
