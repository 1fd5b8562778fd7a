"""The one error type of the evals package: bad benchmark files, items or checkpoints."""
from __future__ import annotations


class EvalError(ValueError):
    """Bad evaluation input. The message names the file (and line / item / field where known)."""
