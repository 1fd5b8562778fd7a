"""Loading checkpoint files without unpickling untrusted code.

Every ``.pt`` is read with ``torch.load(weights_only=True)`` and the allow-list below (DeepSpeed's ZeRO
files hold a ``LossScaler`` object, a ``ZeroStageEnum`` and ``fragment_address`` tuples; older trainer
states hold numpy RNG arrays); DeepSpeed's own ``load_checkpoint`` is routed through the same function
by ``make_engine_loads_safe`` (its ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``).
Before a resume, each file's pickle is scanned for globals outside the allow-list without executing it
(``unsafe_globals``); a hit is refused.
"""
from __future__ import annotations

import pickle
import zipfile
from typing import Any, List

import torch

from megaslm.checkpoint.layout import CheckpointError, one_line


def _safe_globals() -> List[Any]:
    """The non-tensor types our checkpoints hold (and nothing that runs code when rebuilt)."""
    import numpy as np

    out: List[Any] = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # reading offline without deepspeed: such files are refused with a clear error
        pass
    # trainer states written before the RNG record was tensors only (numpy's MT19937 key array)
    out += [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return out


def _allowed_names() -> set:
    return {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()} | {"numpy._core.multiarray._reconstruct",
                                                                            "numpy.core.multiarray._reconstruct"}


def safe_load(path: str, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)`` with the allow-list; a refusal or a bad file is one line."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError, zipfile.BadZipFile,
            OSError) as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {one_line(e)}") from None


def unsafe_globals(path: str) -> List[str]:
    """Globals the file's pickle would import that are not allow-listed (found WITHOUT unpickling)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    ok = _allowed_names()
    return [g for g in found if g not in ok]


def make_engine_loads_safe(engine) -> None:
    """The one adapter for DeepSpeed's ``load_checkpoint``: its checkpoint engine reads every model,
    optimizer and scheduler file through ``safe_load`` instead of ``torch.load(weights_only=False)``."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        raise CheckpointError("DeepSpeed engine has no checkpoint_engine (an unsupported DeepSpeed version?)")
    ce.load = lambda path, map_location=None: safe_load(path, map_location or "cpu")
