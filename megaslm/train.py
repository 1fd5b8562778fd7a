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

A whole run around the trainer (the output directory's lock, the resume choice, SIGTERM):
``megaslm.run``.
"""
from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megaslm import checkpoint, ds_adapter, parallel, sharding, telemetry, tracking
from megaslm.config import ConfigError, DataSource, RunConfig, StageConfig, config_digest
from megaslm.data import Batch, build_stage_dataset, collate, load_step, stage_plans, step_source_tokens
from megaslm.model import build_model, num_parameters


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient under ``faults.nan_policy: stop`` (nothing is saved)."""


# ------------------------------------------------------------------------------------------------
# What the caller hands in: periodic evaluation and (tests only) fault injection
# ------------------------------------------------------------------------------------------------
# ``evaluator(chunks, cfg, step) -> {name: value}``: collective over every rank, called every
# ``cfg.eval.interval`` steps with the training chunks at the training layout. The launcher passes
# ``evals.hooks.evaluate_chunks``; megaslm itself never imports evals.
Evaluator = Callable[[List[torch.nn.Module], RunConfig, int], Dict[str, float]]


class Faults:
    """Fault injection points of the training step. Production runs use this class as it is (every
    method does nothing); tests hand the Trainer a subclass that plants faults at chosen steps."""

    def loss_factor(self, step: int) -> Optional[float]:
        """A factor every micro-batch loss of optimizer step ``step`` is multiplied by (None: none)."""
        return None

    def after_backward(self, step: int, trainer: "Trainer") -> None:
        """Called after the step's backward, before the finiteness check and the update."""

    def before_commit(self, step: int) -> None:
        """Called on rank 0 inside the checkpoint save of ``step``: its tmp directory is complete and
        not yet renamed (a kill here must leave the previous checkpoint as the one to resume)."""


def param_groups(chunks: List[torch.nn.Module], weight_decay: float):
    """Weight decay on matrices; none on norms, biases (megatron's convention). The language table
    (``model.language_embedding``) is an embedding matrix and is decayed like the word embedding;
    the checkpoint reader re-derives these groups by the same rule (``megaslm.sharding.decay_groups``)."""
    named, seen = [], set()
    for c in chunks:
        for name, p in c.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            named.append((name, p))
    return [{"params": [p for _, p in group], "weight_decay": weight_decay if i == 0 else 0.0}
            for i, group in enumerate(sharding.decay_groups(named))]


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
    def __init__(self, cfg: RunConfig, log=print, evaluator: Optional[Evaluator] = None,
                 faults: Optional[Faults] = None):
        if not torch.cuda.is_available():
            # name DeepSpeed's accelerator instead of letting it warn on every rank that it guessed
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
        self.evaluator = evaluator
        self.faults = faults if faults is not None else Faults()
        # the one rank-set whose loss sum counts: last pipeline stage, first tensor-parallel rank
        # (every TP rank holds the same loss); summed over DP by the step's one fused all-reduce
        self._counts_loss = (ps.is_pipeline_last_stage(ignore_virtual=True)
                             and ps.get_tensor_model_parallel_rank() == 0)
        if not self.cuda:
            # parallel.cpu_threads per rank (default 1: bit-reproducible whatever the machine's load, and
            # ranks sharing a CPU do not thrash each other)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(cfg.cpu_threads_per_rank(local))

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
        if not self.cuda:
            ds_adapter.skip_cpu_shm_op()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, mpu=parallel.DeepSpeedMpu(),
            config=ds_adapter.engine_config(cfg, self.dp_size, self.cuda), dist_init_required=False,
        )
        if self.pp > 1:
            self._setup_pipeline_hooks()
        if cfg.parallel.zero_stage == 0:
            ds_adapter.keep_zero0_grad_norm(self.engine)
        self.plans = stage_plans(cfg)
        self.step = 0                      # optimizer steps done (skipped ones included)
        self.tokens_seen = 0               # input positions trained on (global), exact per stage budget
        self.stage_index = 0
        self.stage_step = 0
        self.stage_tokens: Dict[str, int] = {p.name: 0 for p in self.plans}
        self.source_tokens: Dict[str, Dict[str, int]] = {
            st.name: {d.path: 0 for d in st.data} for st in cfg.schedule.stages}
        self.steps_skipped = 0
        self.history: List[Dict] = []
        self._datasets: Dict[int, object] = {}
        self._valid = None                 # the held-out dataset (eval.valid), built at first use
        self._last_saved: Optional[int] = None
        self.stop_requested = False        # set by the SIGTERM handler or the launcher watch
        self.stop_reason = "SIGTERM"
        self._stop_agreed = False          # some rank had stop_requested at the last step's all-reduce
        self.preempted = False
        self.gpu = telemetry.GpuMonitor()

    # ---- logging ------------------------------------------------------------------------
    def is_logger(self) -> bool:
        return self.rank == dist.get_world_size() - 1 if self.pp > 1 else self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_logger():
            self._log(msg)

    # ---- pipeline plumbing --------------------------------------------------------------
    def _setup_pipeline_hooks(self) -> None:
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
    def train_step(self, batch: Batch) -> Dict:
        """Forward/backward over this rank's share of the global batch, then the optimizer step.

        Communication per step, besides what DeepSpeed and megatron do for the gradients: one
        all-reduce of the global loss-token count (the loss scale), and one fused all-reduce over
        the world of [loss sum, non-finite local gradient flag, stop flag], read back to the host
        once. The gradient norm stays on the device (``grad_norm`` is a tensor or None); the
        trainer converts it once per log interval.

        A non-finite loss or gradient before the update either raises ``NonFiniteError``
        (``faults.nan_policy: stop``) or drops the gradients without an update (``skip``; the lr
        schedule still advances so it stays aligned with the step count)."""
        from megaslm.layers import language_ids

        cfg = self.cfg
        step = self.step + 1
        micro = batch.split(batch.num_sequences // cfg.schedule.micro_batch_size)
        total = batch.loss_mask.sum(dtype=torch.float64).to(self.device)
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        scale = self.dp_size / total.clamp(min=1.0)     # on device: no host sync before backward
        poison = self.faults.loss_factor(step)
        lsum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.pp == 1:
            for mb in micro:
                mb = mb.to(self.device)
                with language_ids(self.chunks[0], mb.lang_ids):
                    out = self.engine(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
                tok = (out.float() * mb.loss_mask).sum()
                if poison is not None:
                    tok = tok * poison
                self.engine.backward(tok * scale.float(), scale_wrt_gas=False)
                lsum += tok.detach().double()
        else:
            lsum = self._pipeline_forward_backward(micro, scale.float(), poison)
        self.faults.after_backward(step, self)
        flags = torch.stack([lsum if self._counts_loss else torch.zeros_like(lsum),
                             self._local_grads_nonfinite(),
                             torch.tensor(1.0 if self.stop_requested else 0.0, dtype=torch.float64,
                                          device=self.device)])
        dist.all_reduce(flags)
        loss_sum, bad_grad, stop, T = torch.cat([flags, total.reshape(1)]).tolist()   # the step's host sync
        self._stop_agreed = stop > 0
        loss = loss_sum / max(T, 1.0)
        if not math.isfinite(loss) or bad_grad > 0:
            return self._non_finite("loss" if not math.isfinite(loss) else "gradient", loss, T)
        self.engine.step()
        gn = ds_adapter.grad_norm_tensor(self.engine)
        if gn is not None and cfg.parallel.zero_stage >= 2 and not math.isfinite(gn.item()):
            # ZeRO-2/3 partition gradients during backward, so the check above cannot see them:
            # their norm is only known after the update (one extra sync, at ZeRO-2/3 only)
            raise NonFiniteError(f"step {step}: non-finite gradient norm ({gn.item()}) detected after the "
                                 f"update; stopping without saving ({self._newest_note()})")
        return {"loss": loss, "grad_norm": gn, "loss_tokens": T, "skipped": False}

    def _local_grads_nonfinite(self) -> torch.Tensor:
        """1.0 if any gradient this rank holds is NaN/Inf, else 0.0 (a device tensor, no sync)."""
        grads = [p.grad for c in self.chunks for p in c.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        total = torch.stack(torch._foreach_norm(grads)).sum()
        return (~torch.isfinite(total)).double()

    def _newest_note(self) -> str:
        tag = checkpoint.newest_complete(self.checkpoint_dir())
        return f"newest checkpoint: {tag}" if tag else "no checkpoint saved yet"

    def _non_finite(self, what: str, loss: float, T: float) -> Dict[str, float]:
        step = self.step + 1
        policy = self.cfg.faults.nan_policy
        if policy == "stop" or self.steps_skipped >= self.cfg.faults.max_skipped_steps:
            extra = "" if policy == "stop" else f" and faults.max_skipped_steps={self.cfg.faults.max_skipped_steps} reached"
            raise NonFiniteError(
                f"step {step} (stage {self.plans[self.stage_index].name}): non-finite {what} (loss={loss}); "
                f"faults.nan_policy={policy}{extra}: stopping without saving ({self._newest_note()})")
        # skip: drop the gradients, no optimizer update; keep the lr schedule aligned with the step count
        self.engine.optimizer.zero_grad(set_to_none=True)
        for c in self.chunks:
            for p in c.parameters():
                p.grad = None
        self.scheduler.step()
        self.steps_skipped += 1
        self.log(f"step {step}: non-finite {what} (loss={loss}); skipped (faults.nan_policy=skip, "
                 f"{self.steps_skipped} skipped so far)")
        return {"loss": loss, "grad_norm": None, "loss_tokens": T, "skipped": True}

    def _pipeline_forward_backward(self, micro: List[Batch], scale: torch.Tensor, poison=None) -> torch.Tensor:
        collected: List[torch.Tensor] = []

        def loss_func(mask, output):
            tok = (output.float() * mask).sum()
            if poison is not None:
                tok = tok * poison
            collected.append(tok.detach().double())
            return tok * scale, mask.sum().to(torch.int), {"tok": tok.detach()}

        self._run_pipeline(micro, loss_func, forward_only=False)
        return torch.stack(collected).sum() if collected else torch.zeros((), dtype=torch.float64, device=self.device)

    def _run_pipeline(self, micro: List[Batch], loss_func, forward_only: bool) -> None:
        """megatron-core's pipeline schedule over ``micro``; ``loss_func(mask, output)`` on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megaslm.layers import language_ids

        device = self.device

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(device)
            # GPTModel.forward takes no language ids: they reach the first stage's embedding through
            # megaslm.layers.language_ids (set for this call only; no-op on later stages)
            with language_ids(model, mb.lang_ids):
                out = model(mb.tokens, mb.position_ids, attention_mask=mb.segment_ids, labels=mb.labels)
            return out, partial(loss_func, mb.loss_mask)

        iters = [iter(micro) for _ in self.chunks]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(self.chunks) > 1 else iters[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=forward_only,
        )

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

    def counters(self) -> Dict:
        return checkpoint.TrainState.of(self).to_dict()

    def save(self) -> str:
        """Atomic checkpoint of model, optimizer, scheduler, RNG, data position and token counters."""
        meta = {"config_digest": config_digest(self.cfg), "config": self.cfg.to_dict(),
                "stage_budgets": {p.name: p.tokens for p in self.plans}, "time": time.time()}
        path = checkpoint.save(self.engine, self.checkpoint_dir(), checkpoint.TrainState.of(self), meta,
                               self.cfg.checkpoint.keep_last, before_commit=self.faults.before_commit)
        self._last_saved = self.step
        return path

    def load(self, directory: Optional[str] = None, resume=None) -> bool:
        """Resume from ``resume`` (chosen by ``checkpoint.select_resume`` before the model was built), else
        from the newest intact checkpoint under ``directory`` (default: this run's) or ``directory``
        itself when it is one checkpoint. False: none (then ``model.init_from`` applies, if set)."""
        if self.rank == 0:
            checkpoint.remove_partial(self.checkpoint_dir())
        dist.barrier()
        if resume is None:
            resume = checkpoint.select_resume(self.cfg, dist.get_world_size(), allow_config_change=True,
                                              directory=directory, warn=self._log)
        if resume is None:
            if self.cfg.model.init_from:
                from megaslm.interop.hf import apply_init_from

                apply_init_from(self.chunks, self.cfg, self.engine)
            return False
        if checkpoint.is_canonical(resume.tag_dir):
            path, state = resume.tag_dir, checkpoint.load_canonical_into(self, resume.tag_dir)
        else:
            path, state, rng, _ = checkpoint.load(self.engine, resume.tag_dir)
            checkpoint.set_rng_state(rng)
        state.restore_into(self)
        checkpoint.realign_lr(self.scheduler, self.cfg.optimizer.lr, self.step)
        self._last_saved = self.step
        self.log(f"resumed from {path} at step {self.step} (stage {self.stage_index}, step {self.stage_step} "
                 f"in stage; {self.tokens_seen:,} tokens seen)")
        return True

    def close(self) -> None:
        """Release the engine before the process group goes (``parallel.destroy`` after this): every
        rank finishes together, then DeepSpeed drops its hooks and buffers. Leaving them to the
        interpreter's exit let a DP=2 ZeRO-2 run abort in a C++ destructor (exit 250)."""
        dist.barrier()
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self._datasets.clear()

    # ---- pre-emption --------------------------------------------------------------------
    def request_stop(self, signum=None, frame=None) -> None:
        self.stop_requested = True

    def launcher_gone(self, pid: int, command: str) -> None:
        """``procwatch.LauncherWatch``'s callback (its thread): stop at the next step as for SIGTERM."""
        self.stop_reason = f"the launcher, pid {pid} ({command}), is gone"
        self.stop_requested = True

    def stop_agreed(self) -> bool:
        """Every rank stops at the same step if any of them got SIGTERM (agreed by the step's
        fused all-reduce, so all ranks read the same answer after the same step)."""
        return self._stop_agreed

    # ---- held-out loss ------------------------------------------------------------------
    VALID_SEED_OFFSET = 7919   # the held-out sample order's seed offset (stages use 0, 1, 2, ...)

    def valid_loss(self) -> float:
        """Mean per-token loss over the first ``eval.valid_sequences`` sequences of ``eval.valid``
        (forward only, no gradient; collective). The same fixed sample at every call, so the values of
        one run, and of runs that share ``eval.valid``, are comparable. One host sync."""
        from megaslm.layers import language_ids

        cfg = self.cfg
        if self._valid is None:
            stage = StageConfig(name="valid", train_steps=1, data=[DataSource(p, 1.0) for p in cfg.eval.valid])
            self._valid = build_stage_dataset(cfg, stage, cfg.eval.valid_sequences, seed_offset=self.VALID_SEED_OFFSET)
        per = cfg.eval.valid_sequences // self.dp_size
        a = self.dp_rank * per
        batch = collate([self._valid[i] for i in range(a, a + per)], cfg)
        micro = batch.split(per // cfg.schedule.micro_batch_size)
        lsum = torch.zeros((), dtype=torch.float64, device=self.device)
        tsum = torch.zeros((), dtype=torch.float64, device=self.device)
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad():
                if self.pp == 1:
                    for mb in micro:
                        mb = mb.to(self.device)
                        with language_ids(self.chunks[0], mb.lang_ids):
                            out = self.chunks[0](mb.tokens, mb.position_ids, attention_mask=mb.segment_ids,
                                                 labels=mb.labels)
                        lsum += (out.float() * mb.loss_mask).sum().double()
                        tsum += mb.loss_mask.sum().double()
                else:
                    lsum, tsum = self._pipeline_forward_only(micro)
        finally:
            for c in self.chunks:
                c.train()
        both = torch.stack([lsum, tsum]) if self._counts_loss else torch.zeros(2, dtype=torch.float64,
                                                                                device=self.device)
        dist.all_reduce(both)
        loss, tokens = both.tolist()
        return loss / max(tokens, 1.0)

    def _pipeline_forward_only(self, micro: List[Batch]):
        sums: List[torch.Tensor] = []

        def loss_func(mask, output):
            tok = (output.float() * mask).sum()
            sums.append(torch.stack([tok.double(), mask.sum().double()]))
            return tok, mask.sum().to(torch.int), {}

        self._run_pipeline(micro, loss_func, forward_only=True)
        total = torch.stack(sums).sum(0) if sums else torch.zeros(2, dtype=torch.float64, device=self.device)
        return total[0], total[1]

    # ---- periodic evaluation ------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        """Score ``cfg.eval.benchmarks`` with the training chunks at the training layout (collective).

        Through the ``evaluator`` handed in (launchers/pretrain.py: ``evals.hooks.evaluate_chunks``, the
        same code as ``launchers/eval.py``); its scores go into the metrics log under ``eval``."""
        if self.evaluator is None:
            raise ConfigError(f"eval.interval={self.cfg.eval.interval}: no evaluator was handed to the trainer "
                              "(launchers/pretrain.py passes evals.hooks.evaluate_chunks)")
        flat = self.evaluator(self.chunks, self.cfg, self.step)
        scores = {k[len("eval/"):] if k.startswith("eval/") else k: v for k, v in flat.items()}
        self.log(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
        return scores

    # ---- the loop -----------------------------------------------------------------------
    def _flush(self, pending: List[Dict], sink, announce: bool = False) -> None:
        """Write the buffered step records: their gradient norms (device tensors) come to the host
        together, once per log interval, not once per step."""
        if not pending:
            return
        norms = [r["grad_norm"] for r in pending]
        on_device = [n for n in norms if n is not None]
        values = iter(torch.stack(on_device).tolist()) if on_device else iter(())
        for r, n in zip(pending, norms):
            r["grad_norm"] = next(values) if n is not None else float("nan")
            if sink is not None:
                sink.write(r)
        rec = pending[-1]
        if announce:
            mfu = f" | MFU {rec['mfu'] * 100:.1f}%" if rec["mfu"] is not None else ""
            self.log(f"step {rec['step']:6d} | {rec['stage']} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                     f"grad norm {rec['grad_norm']:.3f} | tokens {rec['tokens_seen']:,} | "
                     f"{rec['tokens_per_s']:,.0f} tok/s | {rec['step_time_s'] * 1000:.0f} ms{mfu}")
        pending.clear()

    def fit(self, max_steps: Optional[int] = None) -> List[Dict]:
        """Train through the remaining stages (at most ``max_steps`` steps in this call); returns every step's
        record. Stops early, after a checkpoint, when the ranks agreed to (SIGTERM, launcher gone)."""
        cfg = self.cfg
        # on resume, metrics.jsonl is cut back to the checkpoint's step first: re-run steps appear once
        sink = telemetry.MetricsSink(cfg.output_dir, cfg.logging.jsonl, cfg.logging.tensorboard, resume_step=self.step,
                                     tracker=tracking.open_tracker(cfg)) if self.is_logger() else None
        self.log(f"model: {num_parameters(self.chunks):,} parameters on this rank; layout TP={self.layout.tensor} "
                 f"PP={self.layout.pipeline} DP={self.layout.data} ZeRO-{cfg.parallel.zero_stage}; "
                 f"{self.total_steps} steps x {cfg.tokens_per_step:,} tokens; stages: "
                 + ", ".join(f"{p.name} {p.tokens:,} tokens / {p.steps} steps" for p in self.plans))
        t_last = time.time()
        done = 0
        pending: List[Dict] = []   # step records not yet written (their grad norms still on the device)
        try:
            while self.stage_index < len(self.plans):
                plan = self.plans[self.stage_index]
                if self.stage_step >= plan.steps:
                    self._flush(pending, sink)
                    self._end_stage(plan)
                    continue
                if max_steps is not None and done >= max_steps:
                    break
                rec, t_last = self._train_one_step(plan, t_last)
                done += 1
                self.history.append(rec)
                pending.append(rec)
                if self._after_step(rec, pending, sink):
                    break
        finally:
            self._flush(pending, sink)
            if sink is not None:
                sink.close()
        return self.history

    def _end_stage(self, plan) -> None:
        self.log(f"stage {plan.name} done at step {self.step}: {self.stage_tokens[plan.name]:,} tokens "
                 f"(budget {plan.tokens:,}); per source {self.source_tokens.get(plan.name, {})}")
        self.stage_index += 1
        self.stage_step = 0

    def _train_one_step(self, plan, t_last: float) -> Tuple[Dict, float]:
        """One step of the current stage: its batch, the update, the token counters; (its record, its end time)."""
        cfg = self.cfg
        ds = self.stage_dataset(self.stage_index)
        step_tokens = plan.step_tokens(self.stage_step, cfg.tokens_per_step)
        batch = load_step(ds, cfg, self.stage_step, self.dp_rank, self.dp_size, step_tokens)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses (the scheduler steps inside)
        out = self.train_step(batch)
        per_source = step_source_tokens(ds, cfg, cfg.schedule.stages[self.stage_index], self.stage_step, step_tokens)
        self.step += 1
        self.stage_step += 1
        self.tokens_seen += step_tokens
        self.stage_tokens[plan.name] += step_tokens
        for src, n in per_source.items():
            self.source_tokens[plan.name][src] = self.source_tokens[plan.name].get(src, 0) + n
        now = time.time()
        dt = max(now - t_last, 1e-9)
        tps = step_tokens / dt
        rec = {"step": self.step, "stage": plan.name, "stage_step": self.stage_step,
               "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
               "skipped": out.get("skipped", False), "step_tokens": step_tokens,
               "tokens_seen": self.tokens_seen, "stage_tokens": self.stage_tokens[plan.name],
               "source_tokens": dict(self.source_tokens[plan.name]),
               "tokens_per_s": tps, "step_time_s": dt,
               "mfu": telemetry.mfu(cfg, tps, dist.get_world_size(), self.gpu.name,
                                    cfg.resolved_precision(self.cuda))}
        if self.cuda:
            rec.update(self.gpu.read())
        return rec, now

    def _after_step(self, rec: Dict, pending: List[Dict], sink) -> bool:
        """What follows a step: the held-out loss, the records written, a checkpoint, an evaluation. True when
        the ranks agreed to stop (a checkpoint of this step saved)."""
        cfg = self.cfg
        saving = bool(cfg.checkpoint.save and cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)
        evaluating = bool(cfg.eval.interval and self.step % cfg.eval.interval == 0)
        if cfg.eval.valid and (self.step % cfg.eval.valid_interval == 0 or self.step == self.total_steps):
            rec["valid_loss"] = self.valid_loss()
            self.log(f"step {self.step}: valid loss {rec['valid_loss']:.4f} "
                     f"({cfg.eval.valid_sequences} held-out sequences)")
        stopping = self.stop_agreed()
        announce = self.step % cfg.logging.interval == 0 or self.step == 1 or self.step == self.total_steps
        if announce or saving or evaluating or stopping:
            # records reach metrics.jsonl before a checkpoint that covers them is written
            self._flush(pending, sink, announce)
        if saving:
            self.log(f"saved {self.save()}")
        if evaluating:
            scores = self.evaluate()
            if sink is not None:
                sink.write({"step": self.step, "eval": scores})
        if stopping:
            self.preempted = True
            if cfg.checkpoint.save and self._last_saved != self.step:
                self.log(f"saved {self.save()}")
        return stopping

