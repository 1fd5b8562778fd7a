"""Make megatron-core 0.16 run on a machine without CUDA (CI, laptops, the embedded default).

megatron-core hard-codes CUDA in a few places that no config flag avoids (see
shared/notes/cpu-stack.md): buffers allocated on ``torch.cuda.current_device()``, a
``device="cuda"`` token counter in every pipeline schedule, ``torch.cuda.synchronize()`` in the p2p
code, and an RNG tracker that forks the CUDA generator (attention always enters it, even at dropout 0).

What this does, only when CUDA is absent (``apply()`` is a no-op otherwise):
  * each module in ``PATCHED_MODULES`` gets its own ``torch`` global replaced by a thin proxy whose
    ``cuda.current_device()`` is the CPU, ``cuda.synchronize()`` a no-op, and whose tensor factories
    map ``device="cuda"`` to the CPU. torch itself is left untouched for every other library;
  * the model-parallel RNG tracker is replaced by one with the same interface that forks the CPU
    generator, so dropout in tensor-parallel regions still differs per TP rank as on GPU;
  * activation recompute (megatron's ``CheckpointFunction``) saves and restores "the CUDA RNG state"
    through ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``: without CUDA the first returns an empty
    state and the second ignores it (the CPU generator and the tracker's states, which the same code
    saves beside it, are what a CPU recompute replays).

``check_patch_targets()`` verifies that every patched name still exists and still uses CUDA the way
this layer expects; tests call it so a megatron-core upgrade that moves these names fails loudly.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from typing import Dict, List

import torch

# module -> the source fragments that make it need the proxy (checked by check_patch_targets)
PATCHED_MODULES: Dict[str, List[str]] = {
    "megatron.core.utils": ["device=torch.cuda.current_device()"],
    "megatron.core.tensor_parallel.mappings": ["device=torch.cuda.current_device()"],
    "megatron.core.tensor_parallel.layers": [],
    "megatron.core.tensor_parallel.cross_entropy": [],
    "megatron.core.pipeline_parallel.p2p_communication": ["torch.cuda.current_device()", "torch.cuda.synchronize()"],
    "megatron.core.pipeline_parallel.schedules": ['device="cuda"'],
    "megatron.core.models.gpt.gpt_model": ["torch.cuda.current_device()"],
    "megatron.core.transformer.attention": ["torch.cuda.current_device()"],
    "megatron.core.transformer.dot_product_attention": ["torch.cuda.current_device()"],
    "megatron.core.transformer.module": [],
    "megatron.core.models.common.embeddings.rotary_pos_embedding": ["torch.cuda.current_device()"],
    # ``weight.data.cuda()`` when tying embeddings across pipeline stages: see ``tensor_cuda_is_identity``
    "megatron.core.models.common.language_module.language_module": ["weight.data.cuda()"],
}
RNG_MODULE = "megatron.core.tensor_parallel.random"
RNG_NAMES = ["CudaRNGStatesTracker", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed",
             "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
             "_MODEL_PARALLEL_RNG_TRACKER_NAME", "_DATA_PARALLEL_RNG_TRACKER_NAME",
             "_EXPERT_PARALLEL_RNG_TRACKER_NAME", "_get_cuda_rng_state", "_set_cuda_rng_state"]

_applied = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cuda" else d


class _CudaOnCpu:
    """Stands in for ``torch.cuda`` inside the patched megatron modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def is_available():
        return False


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    return wrapped


class _TorchOnCpu(types.ModuleType):
    """A module-local ``torch`` for the patched modules: everything forwards to the real torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "empty_like",
                     "zeros_like", "ones_like"):
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Same interface as megatron's CudaRNGStatesTracker, forking the CPU generator instead."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def check_patch_targets() -> None:
    """Raise RuntimeError if a megatron-core upgrade moved or changed what this layer patches."""
    import inspect

    problems = []
    for modname, fragments in PATCHED_MODULES.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            problems.append(f"{modname}: cannot import ({e})")
            continue
        if not isinstance(getattr(mod, "torch", None), types.ModuleType):
            problems.append(f"{modname}: has no module-level 'torch' to replace")
            continue
        src = inspect.getsource(importlib.import_module(modname)) if fragments else ""
        for frag in fragments:
            if frag not in src:
                problems.append(f"{modname}: no longer contains {frag!r} (the CUDA call this layer neutralises)")
    rng = importlib.import_module(RNG_MODULE)
    for name in RNG_NAMES:
        if not hasattr(rng, name):
            problems.append(f"{RNG_MODULE}.{name}: missing")
    if problems:
        raise RuntimeError("megatron-core changed under megaslm.cpu_compat; revisit the CPU layer:\n  "
                           + "\n  ".join(problems))


def apply(force: bool = False) -> bool:
    """Install the CPU layer when CUDA is absent (or ``force``). Returns True if it is active."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    proxy = _TorchOnCpu()
    for modname in PATCHED_MODULES:
        mod = importlib.import_module(modname)
        mod.torch = proxy
    install_cpu_rng_tracker()
    rng = importlib.import_module(RNG_MODULE)
    rng._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    rng._set_cuda_rng_state = lambda *a, **k: None
    _applied = True
    return True


def install_cpu_rng_tracker() -> CpuRNGStatesTracker:
    rng = importlib.import_module(RNG_MODULE)
    tracker = CpuRNGStatesTracker()
    rng._CUDA_RNG_STATE_TRACKER = tracker
    rng._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """While building a model without CUDA, ``Tensor.cuda()`` returns the tensor itself.

    megatron-core's LanguageModule moves the tied output weight with ``weight.data.cuda()`` before the
    first/last-stage all-reduce; a tensor method cannot be redirected per module, so it is scoped to
    model construction instead (``megaslm.model.build_model``).
    """
    if not _applied:
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def is_applied() -> bool:
    return _applied


def model_parallel_manual_seed(seed: int) -> None:
    """CPU twin of megatron's ``model_parallel_cuda_manual_seed`` (same seed offsets)."""
    from megatron.core import parallel_state as ps

    rng = importlib.import_module(RNG_MODULE)
    tracker = install_cpu_rng_tracker()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank() if hasattr(ps, "get_expert_model_parallel_rank") else 0
    etp_rank = ps.get_expert_tensor_parallel_rank() if hasattr(ps, "get_expert_tensor_parallel_rank") else 0
    torch.manual_seed(seed)
    tracker.add(rng._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(rng._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(rng._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
