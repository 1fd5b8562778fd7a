"""One training run end to end, as launchers/pretrain.py starts it: the checks before any process group
(the config against the world, every dataset's manifest), the output directory's lock (one run per
directory), the checkpoint to resume chosen once by rank 0 and told to every rank, then the
``megaslm.train.Trainer`` under SIGTERM and the launcher watch, and its final checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megaslm import checkpoint, parallel
from megaslm.checkpoint.lock import RunLock
from megaslm.config import ConfigError, RunConfig
from megaslm.data import check_manifest
from megaslm.procwatch import LauncherWatch
from megaslm.train import Evaluator, Faults, Trainer


def run(cfg: RunConfig, log=print, max_steps: Optional[int] = None, evaluator: Optional[Evaluator] = None,
        faults: Optional[Faults] = None, allow_config_change: bool = False) -> List[Dict]:
    """Train ``cfg`` end to end (used by launchers/pretrain.py): resume, fit, final checkpoint.

    ``cfg`` is final when it comes in (nothing here changes it): every stage names its datasets
    (launchers/pretrain.py builds the demo corpus and fills them in for ``data.demo``), and with
    ``eval.interval`` an ``evaluator`` is given (the launcher passes ``evals.hooks.evaluate_chunks``).
    ``faults``: test-only fault injection (see ``Faults``).

    SIGTERM (a cluster's pre-emption) makes every rank finish the current step, save a checkpoint
    and return normally (the launcher exits 0); the next run resumes from it. The process group is
    left up for the caller (``parallel.destroy()`` tears it down in order)."""
    world = parallel.env_world()
    cfg.validate(world_size=world["world_size"], cuda=torch.cuda.is_available())
    for i, stage in enumerate(cfg.schedule.stages):
        if not stage.data:
            raise ConfigError(f"schedule.stages[{i}].data: no dataset; with data.demo=true the launcher "
                              "(launchers/pretrain.py) builds the demo corpus and names it here")
    if cfg.eval.interval and evaluator is None:
        raise ConfigError(f"eval.interval={cfg.eval.interval}: no evaluator given to megaslm.run.run "
                          "(pass evaluator=evals.hooks.evaluate_chunks, as launchers/pretrain.py does)")
    # every dataset (once, however many stages name it) exists, is intact and maps units as this run's
    # vocabulary does: checked before any process group, model or output directory exists. The content
    # hash reads every byte, so only each node's local rank 0 computes it (the node's other ranks read
    # the same files; a refusal there ends the job through the launcher)
    hash_here = cfg.data.verify_hash and world["local_rank"] == 0
    paths = [src.path for stage in cfg.schedule.stages for src in stage.data] + list(cfg.eval.valid)
    for path in dict.fromkeys(paths):
        check_manifest(path, cfg.vocab, verify_hash=hash_here, need_lang=cfg.model.language_embedding)
    # one run per output_dir: rank 0 takes the directory's lock before anything in it is read or
    # written; every rank learns the outcome right after the process group exists
    lock, refused = None, None
    if world["rank"] == 0:
        try:
            lock = RunLock(cfg.output_dir).acquire()
        except ConfigError as e:
            refused = str(e)
    try:
        parallel.init_distributed()
        box = [refused]                      # rank 0's outcome on every rank
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
        if refused:
            raise ConfigError(refused)
        return _run_locked(cfg, world, log, max_steps, evaluator, faults, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: RunConfig, world: Dict[str, int], log, max_steps, evaluator, faults,
                allow_config_change: bool) -> List[Dict]:
    # the checkpoint to resume (intact, same run-changing config) is chosen before the model is built,
    # by rank 0 alone (the content check reads every byte once, not once per rank), then told to all:
    # ranks that chose apart would load different steps
    box = [None]
    if world["rank"] == 0:
        try:
            box = [("ok", checkpoint.select_resume(cfg, world["world_size"], allow_config_change, warn=log))]
        except ConfigError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise checkpoint.CheckpointError(box[0][1])
    resume = box[0][1]
    if world["rank"] == 0:
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
    trainer = Trainer(cfg, log=log, evaluator=evaluator, faults=faults)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, trainer.request_stop)
    # a launcher killed alone (the deepspeed runner's pid) stops the run as SIGTERM does
    watch = LauncherWatch(trainer.launcher_gone)
    try:
        trainer.load(cfg.checkpoint.load, resume=resume)
        history = trainer.fit(max_steps=max_steps)
        if cfg.checkpoint.save and trainer.step > 0 and trainer._last_saved != trainer.step:
            trainer.log(f"saved {trainer.save()}")
    finally:
        watch.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if trainer.preempted:
        trainer.log(f"pre-empted ({trainer.stop_reason}): checkpoint saved at step {trainer.step}; exiting cleanly")
    trainer.close()
    return history
