"""Checks on the installed environment that no single import would report clearly (standard library only).

The one check today: megaslm's Triton kernels live in the top-level package ``kernels`` (a layout the users
fixed). Hugging Face's hub-kernels distribution, also called ``kernels``, installs a top-level package of the
same name, and transformers >= 5.25 requires it. With both installed, whichever comes first on ``sys.path``
shadows the other: from the repository root ours wins, and ``from transformers import LlamaConfig`` dies
with ``cannot import name 'CUDAProperties' from 'kernels'`` (transformers sees the hub-kernels metadata and
imports our package); from elsewhere theirs may win and megaslm's own kernel imports fail. Neither message
says what is wrong, so the entry points (the launchers, ``python -m data_tools``, the HF import/export)
call :func:`kernels_name_clash` first and stop with one line that does.
"""
from __future__ import annotations

import importlib.metadata
from typing import Optional


def kernels_name_clash() -> Optional[str]:
    """One line describing the clash when a distribution named ``kernels`` (not megaslm) is installed, else
    None. Reads only installed metadata (a few milliseconds), never imports either package."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    where = str(dist.locate_file(""))
    return (f"the Hugging Face 'kernels' distribution {dist.version} is installed (in {where}) and shares the "
            f"top-level import name 'kernels' with megaslm's Triton kernels package, so one shadows the other "
            f"(transformers >= 5.25 requires it; setup.py pins transformers<5.25): run "
            f"`pip uninstall -y kernels && pip install 'transformers>=4.45,<5.25'` in this environment")

