"""megaslm/import_hooks.py: megatron-core's and DeepSpeed's torch.compile decorators are deferred to the first call, and nothing
else changes (torch.compile itself, what is compiled, with which options)."""
import os
import subprocess
import sys

import torch

from megaslm.import_hooks import deferred_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import megaslm, torch
real = torch.compile
import megatron.core
from megatron.core import jit
from megatron.core.fusions.fused_bias_gelu import bias_gelu
assert torch.compile is real, "torch.compile left replaced"
assert "torch._inductor.compile_fx" not in sys.modules, "inductor imported by megatron-core's import"
assert jit.jit_fuser.__name__ == "compile_", jit.jit_fuser
assert bias_gelu.__megaslm_deferred_compile__ == {}, "bias_gelu not deferred"
assert megatron.core.__spec__.loader.is_package("megatron.core")   # the wrapped loader answers as the real one
# megatron-core's `try: import wandb` (inference/contexts/dynamic_context.py) binds a module whose code has not run
from megatron.core.inference.contexts import dynamic_context
assert dynamic_context.HAVE_WANDB and "wandb.sdk" not in sys.modules, "wandb loaded by megatron-core's import"
import wandb   # ... and runs on first use: the same module object, whole
assert wandb is dynamic_context.wandb and isinstance(wandb.Settings, type) and "wandb.sdk" in sys.modules
assert type(wandb).__name__ == "module", type(wandb)
import deepspeed
from deepspeed.runtime.zero.muon import original_muon   # what deepspeed.initialize imports to check the optimizer
assert original_muon.zeropower_via_newtonschulz5.__megaslm_deferred_compile__ == {}, "muon not deferred"
assert torch.compile is real and "torch._inductor.compile_fx" not in sys.modules, "inductor imported by deepspeed"
print("ok")
"""


def test_megatron_import_defers_its_compile_decorators():
    """A fresh interpreter, as every rank is: importing megaslm first, then megatron-core."""
    r = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == ["ok"], r.stdout + r.stderr[-3000:]


def test_deferred_compile_calls_the_real_one_once_with_the_same_options():
    calls = []

    def real(model=None, **options):
        calls.append((model, options))
        return lambda *a, **k: ("compiled", model(*a, **k))

    compile_ = deferred_compile(real)

    def f(x, y=1):
        return x + y

    g = compile_(f, mode="max-autotune")
    assert calls == [] and g.__name__ == "f"         # nothing at decoration
    assert g(1, y=2) == ("compiled", 3) and g(2) == ("compiled", 3)
    assert calls == [(f, {"mode": "max-autotune"})]  # once, on the first call, with the options given
    h = compile_(dynamic=False)(f)                   # the @torch.compile(...) form
    assert h(0) == ("compiled", 1) and calls[-1] == (f, {"dynamic": False})
    m = torch.nn.Linear(2, 2)
    compile_(m)                                      # a module goes to the real compile at once
    assert calls[-1] == (m, {})


def test_deferred_function_really_compiles():
    """Through the real torch.compile (the eager backend: dynamo traces it, no C++ toolchain needed)."""
    compiled = deferred_compile(torch.compile)(lambda x: torch.sin(x) * 2, backend="eager")
    x = torch.linspace(0, 1, 7)
    assert torch.equal(compiled(x), torch.sin(x) * 2)
