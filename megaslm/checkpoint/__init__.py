"""The run directory's one owner: checkpoint names, listing, saving, resuming and reading.

    layout     torch-free: tags and file names, ``TrainState``, ``meta.json`` and its manifest, ``latest``,
               listing and resolving checkpoints, pruning — the only code that spells or parses a tag
    safe       the pickle allow-list and safe loading (``torch.load(weights_only=True)``)
    resume     verification, config changes, which checkpoint a run resumes from (with fallback)
    reader     the offline reader: any TP/PP/ZeRO-0/1/2 or canonical checkpoint -> canonical state
    canonical  the layout-free format: written without an engine, loaded into any layout
    engine     saving from and loading into a live DeepSpeed engine (its internals: ``megaslm.ds_adapter``)

Every failure is a ``CheckpointError`` (a ``ConfigError``, so the launchers print it as one line and
exit 2) whose message names the file. The names below are re-exported; all but ``layout``'s are loaded
on first use, so ``import megaslm.checkpoint.layout`` (and this package) costs no torch import.
"""
from __future__ import annotations

import importlib
from typing import Any

from megaslm.checkpoint.layout import (CANON_MODEL, CANON_OPTIM, LATEST, META, MOMENTS, TAG_RE,
                                       CheckpointError, TrainState, checkpoint_step, complete_tags, is_canonical,
                                       is_tag_dir, list_checkpoints, newest_complete, newest_meta, prune,
                                       read_meta, record_crc32, remove_partial, resolve_tag_dir, tag_for,
                                       write_json_atomic, write_latest, write_manifest)

_LAZY = {
    "safe": ("safe_load", "unsafe_globals", "make_engine_loads_safe"),
    "resume": ("Resume", "verify", "check_content", "config_changes", "select_resume"),
    "reader": ("Checkpoint", "read_checkpoint"),
    "canonical": ("write_canonical", "load_canonical_into"),
    "engine": ("save", "load", "rng_state", "set_rng_state", "set_optimizer_state", "set_engine_counters",
               "sync_master_weights", "realign_lr"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}
__all__ = ["CANON_MODEL", "CANON_OPTIM", "LATEST", "META", "MOMENTS", "TAG_RE", "CheckpointError", "TrainState",
           "checkpoint_step", "complete_tags", "is_canonical", "is_tag_dir", "list_checkpoints", "newest_complete",
           "newest_meta", "prune", "read_meta", "record_crc32", "remove_partial", "resolve_tag_dir", "tag_for", "write_json_atomic",
           "write_latest", "write_manifest", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
