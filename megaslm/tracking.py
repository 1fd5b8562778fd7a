"""Experiment tracking in Weights & Biases: the same records as ``metrics.jsonl`` and TensorBoard.

``logging.wandb: true`` (the optional extra: ``pip install -e ".[wandb]"``; the config refuses the run
before any process group when wandb is not installed). Only the rank that writes ``metrics.jsonl``
logs (rank 0; the last pipeline stage with PP > 1). What goes in:

  * every step record and every evaluation record, under the names TensorBoard shows
    (``megaslm.telemetry.scalars``: ``train/loss``, ``eval/<benchmark>``, ``source_tokens/<source>``),
    at the trainer's optimizer step (wandb's ``step``);
  * the resolved config (the run's ``config.yaml``) as the wandb run's config.

A resumed run continues the same wandb run: its id is kept in ``<output_dir>/wandb_run_id`` (written
whole, ``megaslm.fsutil``) and handed back with ``resume="allow"``. Steps re-run after a resume from an
older checkpoint are logged again at their step; wandb keeps the first values of a step it already has.
``logging.wandb_mode: offline`` writes the run under ``<wandb_dir>/wandb/offline-run-*`` only
(``wandb sync`` uploads it later); ``disabled`` makes every call a no-op.
"""
from __future__ import annotations

import os
import secrets
from typing import Dict, Optional

from megaslm.config import RunConfig
from megaslm.fsutil import atomic_write_text
from megaslm.telemetry import scalars

RUN_ID_FILE = "wandb_run_id"


def run_id(output_dir: str) -> str:
    """The wandb run id of ``output_dir``: the stored one, else a new one stored now (before the run starts,
    so a run killed at any point is resumed under the same id)."""
    path = os.path.join(output_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    new = secrets.token_hex(6)   # wandb run ids: [a-z0-9]; 12 hex digits as wandb's own are 8 base-36
    atomic_write_text(path, new + "\n")
    return new


class WandbSink:
    """One wandb run for one trainer's ``fit``: ``write(rec)`` per record, ``close()`` at the end."""

    def __init__(self, cfg: RunConfig):
        import wandb

        lc = cfg.logging
        os.makedirs(cfg.output_dir, exist_ok=True)
        directory = lc.wandb_dir or os.environ.get("WANDB_DIR") or cfg.output_dir
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, name=lc.wandb_name or cfg.name,
                              mode=lc.wandb_mode, dir=directory, tags=list(lc.wandb_tags) or None,
                              config=cfg.to_dict(), id=run_id(cfg.output_dir), resume="allow")

    def write(self, rec: Dict) -> None:
        values = scalars(rec)
        if values:
            self.run.log(values, step=rec["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: RunConfig) -> Optional[WandbSink]:
    """The tracker ``logging`` asks for (the caller is the logging rank), or None."""
    return WandbSink(cfg) if cfg.logging.wandb else None
