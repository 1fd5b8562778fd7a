"""megatron-core's and DeepSpeed's import-time ``torch.compile`` decorators without their cost (standard library
only until one of them loads).

``megatron/core/jit.py`` binds ``jit_fuser = torch.compile`` and the fusion modules that ``import megatron.core``
loads decorate a dozen functions with it. ``torch.compile(fn)`` compiles nothing until ``fn`` is first called,
but merely calling it imports torch._dynamo and torch._inductor: measured on the 2-core CI machine, importing
megatron-core and deepspeed with megaslm's trainer took 7.5-8.6 CPU-seconds, 4.1-4.2 with the decorator deferred.
Every rank of every launch pays it (a CPU test run launches hundreds of ranks), and so does every
``launchers/eval.py`` call, for functions the local layer spec never calls on CPU. DeepSpeed does the same later:
``deepspeed.initialize`` checks the optimizer by importing its Muon module, whose two ``@compiler.compile()``
decorators import them again (the largest single item in a profile of a 5-step tiny run).

:func:`install` (called by ``megaslm/__init__.py``) adds a ``sys.meta_path`` finder that, while a module of
``megatron.core`` or ``deepspeed`` executes, replaces ``torch.compile`` by :func:`deferred_compile` and restores it
when the module is loaded. So ``jit_fuser`` becomes a decorator that calls the real ``torch.compile`` with the
same arguments on the function's first call: what compiles, when, and with which options is unchanged; only the
imports move to where they are needed. Nothing else is touched: ``torch.compile`` is the real one before and
after (tests/test_import_hooks.py), and a megatron-core already imported (before megaslm) is left as it is.
megatron-core offers ``disable_jit_fuser()``, but it can only be called after ``megatron.core`` has been
imported, when the decorators have already run.

The same finder makes the optional packages those modules import at module level only to test for them (``LAZY``:
``megatron/core/inference/contexts/dynamic_context.py`` and ``megatron/core/timers.py`` run ``try: import wandb``,
reached from ``import megatron.core``) load lazily: the module object exists at once (so ``HAVE_WANDB`` is still
true), and its code runs on the first read of an attribute other than its import metadata, e.g. when
``megaslm/tracking.py`` starts a wandb run. Importing wandb cost 1.06 of the 11.8 CPU-seconds of a profiled 5-step
tiny run, in every rank, for a package that run never used. (The standard library's ``importlib.util.LazyLoader``
does not do here: on Python 3.11 any attribute read loads the module, and the import system reads ``__spec__``
when a second module imports it, as timers.py does.)
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys
import types

PACKAGES = ("megatron.core", "deepspeed")
LAZY = ("wandb",)        # loaded lazily when a module of PACKAGES imports it (and nothing loaded it before)
_EXECUTING = [0]         # modules of PACKAGES executing now (nested imports)


def deferred_compile(real):
    """``torch.compile`` with the same signature whose decorated functions call ``real(fn, **options)`` on their
    first call (and the compiled function from then on). Modules and other callables go to ``real`` at once."""

    def compile_(model=None, **options):
        if model is None:                       # used as @torch.compile(mode=...)
            return lambda fn: compile_(fn, **options)
        if not inspect.isfunction(model):
            return real(model, **options)
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            if not compiled:
                compiled.append(real(model, **options))
            return compiled[0](*args, **kwargs)

        first_call_compiles.__megaslm_deferred_compile__ = options
        return first_call_compiles

    compile_.__megaslm_deferred__ = True
    return compile_


class _Loader(importlib.abc.Loader):
    """Wraps megatron.core's own loader: its ``exec_module`` runs with ``torch.compile`` deferred."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):   # get_data, is_package, get_resource_reader, ...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        import torch

        real = torch.compile
        _EXECUTING[0] += 1
        try:
            if getattr(real, "__megaslm_deferred__", False):   # a submodule loaded while its package executes
                self.inner.exec_module(module)
                return
            torch.compile = deferred_compile(real)
            try:
                self.inner.exec_module(module)
            finally:
                torch.compile = real
        finally:
            _EXECUTING[0] -= 1


class _LazyModule(types.ModuleType):
    """A module whose code has not run yet: reading its import metadata (what the import system reads when another
    module imports it again) leaves it so; reading anything else runs its code into this same object first."""

    _META = frozenset({"__spec__", "__name__", "__loader__", "__package__", "__class__", "__dict__"})

    def __getattribute__(self, attr):
        if attr in _LazyModule._META:
            return super().__getattribute__(attr)
        self.__class__ = types.ModuleType                # from here on an ordinary module (also while it runs)
        self.__spec__.loader.exec_module(self)
        return getattr(self, attr)


class _LazyLoader(importlib.abc.Loader):
    """Creates the module as its own loader would; runs its code only on first use (:class:`_LazyModule`)."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.inner
        module.__class__ = _LazyModule


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in LAZY and _EXECUTING[0]:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _LazyLoader(spec.loader)
            return spec
        if not any(fullname == p or fullname.startswith(p + ".") for p in PACKAGES):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Once per process. A module already imported keeps what it has."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
