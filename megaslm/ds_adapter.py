"""Everything the trainer needs from DeepSpeed beyond its public API, in one place.

The trainer uses DeepSpeed's engine for the optimizer (AdamW under ZeRO 0-3), gradient clipping, the
LR scheduler stepping and checkpoint files. Two things are not available through the public API of
deepspeed 0.19.8 and are adapted here, so that a DeepSpeed upgrade has one file to check:

1. ``engine_config``: the engine config the trainer runs under. ``managed_gradient_accumulation:
   false`` (new in 0.19) lets the trainer (or megatron-core's pipeline schedules) drive the
   micro-batches while ``engine.step()`` is the accumulation boundary; one engine step sees all of a
   rank's samples (``gradient_accumulation_steps: 1``).
2. ``keep_zero0_grad_norm``: without ZeRO (stage 0, fp32), ``DeepSpeedEngine.clip_fp32_gradients``
   clips with ``deepspeed.runtime.utils.clip_grad_norm_`` but throws away the norm it computed, so
   ``engine.get_global_grad_norm()`` stays ``None``. We replace that one bound method on the engine
   instance with the same call and the same arguments that also records the norm in
   ``engine._global_grad_norm`` (the attribute ZeRO optimizers fill themselves and
   ``get_global_grad_norm`` returns). Nothing else about clipping changes.
   ``tests/train/test_train_units.py::test_deepspeed_adapter_names_exist`` fails loudly if a DeepSpeed
   release renames what this relies on.

3. ``skip_cpu_shm_op``: on CPU, DeepSpeed's comm backend JIT-compiles its shared-memory all-reduce op
   (``deepspeed_shm_comm``, a C++ build of about a minute on 2 cores, on the first run on each machine)
   when it initialises, although only its inference all-reduce uses it; the trainer communicates through
   torch.distributed (gloo). We mark the op incompatible in DeepSpeed's probed op table
   (``deepspeed.ops.__compatible_ops__``) so ``build_shm_op`` returns None, as it does wherever the op
   cannot be built. The names are checked by the same test.

4. Checkpoint state into a live engine (``megaslm.checkpoint.engine``): ZeRO-1/2 and the bf16 optimizer
   keep fp32 master weights and Adam moments in flat partitions; torch's Adam creates its state at the
   first step and DeepSpeed links each parameter's fragment of it (``lp._hp_mapping``) only then, in the
   private ``_lazy_init_hp_params_optimizer_state`` guarded by ``_hp_optimizer_states_linked``.
   ``link_optimizer_state`` re-runs that linkage once the state exists; ``holds_partition`` /
   ``holds_fragment`` read the mapping. ``set_last_lr`` writes the scheduler's ``_last_lr`` (torch's
   ``LRScheduler.get_last_lr`` returns it; DeepSpeed logs it) after the lr is realigned on resume.
   ``PRIVATE_NAMES`` lists every private name used here; the same test checks each against the
   installed DeepSpeed and torch, and the import-rule test keeps them out of every other file.

``grad_norm_tensor`` returns the norm of the last step as a tensor (or ``None``) without a host
synchronisation, so the trainer can convert it once per log interval.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megaslm.config import RunConfig

# the names this adapter relies on (checked by a test against the installed DeepSpeed)
PATCHED_ENGINE_METHOD = "clip_fp32_gradients"
NORM_ATTRIBUTE = "_global_grad_norm"
HP_MAPPING = "_hp_mapping"                                  # a parameter's fragment of ZeRO's flat partition
LINK_METHOD = "_lazy_init_hp_params_optimizer_state"        # ZeRO-1/2 and bf16 optimizer
LINKED_FLAG = "_hp_optimizer_states_linked"
LAST_LR = "_last_lr"                                        # torch's LRScheduler
PRIVATE_NAMES = (NORM_ATTRIBUTE, HP_MAPPING, LINK_METHOD, LINKED_FLAG, LAST_LR)


def engine_config(cfg: RunConfig, dp_size: int, cuda: bool) -> Dict:
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


def keep_zero0_grad_norm(engine) -> None:
    """Make a ZeRO-0 engine record the gradient norm its clipping computes (see the module doc)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if not hasattr(engine, PATCHED_ENGINE_METHOD):
        raise RuntimeError(f"deepspeed engine has no {PATCHED_ENGINE_METHOD}: megaslm/ds_adapter.py needs updating")

    def clip_and_record():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        setattr(engine, NORM_ATTRIBUTE, norm)

    setattr(engine, PATCHED_ENGINE_METHOD, clip_and_record)


SHM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_op() -> None:
    """CPU only, before ``deepspeed.initialize``: do not build DeepSpeed's shared-memory comm op (see above)."""
    import deepspeed.ops

    table = dict(deepspeed.ops.__compatible_ops__)   # the module probes it on first access and caches it
    table[SHM_OP] = False
    deepspeed.ops.__compatible_ops__ = table


def grad_norm_tensor(engine) -> Optional[torch.Tensor]:
    """The last step's global gradient norm as a 0-d float64 tensor (no host sync), or None when
    DeepSpeed computed none (e.g. ZeRO-0 without clipping)."""
    raw = engine.get_global_grad_norm()
    if raw is None:
        return None
    if torch.is_tensor(raw):
        return raw.detach().reshape(-1)[0].double().clone()   # a copy: DeepSpeed may reuse its buffer
    return torch.tensor(float(raw), dtype=torch.float64)


# ---- checkpoint state into a live engine (see the module doc, 4.) --------------------------------
def can_link_optimizer_state(optimizer) -> bool:
    """Whether this DeepSpeed optimizer links parameter fragments to its Adam state (ZeRO-1/2, bf16)."""
    return hasattr(optimizer, LINK_METHOD)


def link_optimizer_state(optimizer) -> None:
    """Link every parameter's fragment to the Adam state of the flat partitions (created by the caller
    before the first step), as DeepSpeed does itself at its first step."""
    setattr(optimizer, LINKED_FLAG, False)
    getattr(optimizer, LINK_METHOD)()


def holds_partition(param) -> bool:
    """The parameter's master weight and moments live in a DeepSpeed flat partition (ZeRO / bf16 optimizer)."""
    return hasattr(param, HP_MAPPING)


def holds_fragment(param) -> bool:
    """This rank's partition holds a fragment of the parameter (False also without a partition)."""
    return getattr(param, HP_MAPPING, None) is not None


def set_last_lr(scheduler, lrs: List[float]) -> None:
    """What ``scheduler.get_last_lr()`` returns until its next step."""
    setattr(scheduler, LAST_LR, list(lrs))
