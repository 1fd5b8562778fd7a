"""Spawn N ranks over gloo on CPU and collect what each returns (the tests' multi-process launcher).

Each rank is a fresh interpreter (multiprocessing 'spawn') with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_PORT set as the deepspeed launcher would. One spawned group should check several layouts or
cases: a launch costs several seconds on 2 cores.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import traceback
from typing import Any, List, Optional

from megaslm.ports import free_port  # noqa: F401 - the tests take it from here


def _child(rank: int, world: int, port: int, target: str, args: tuple, queue, env: dict) -> None:
    # The kernel tests' conftest sets TRITON_INTERPRET=1 for the whole pytest process; ranks run the
    # torch reference path unless a test asks for the interpreter explicitly.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        mod, _, fn = target.rpartition(":")
        result = getattr(importlib.import_module(mod), fn)(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # report, don't hang the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world: int, target: str, *args: Any, timeout: float = 600.0, env: Optional[dict] = None) -> List[Any]:
    """Run ``module:function(*args)`` on ``world`` ranks; return the per-rank results in rank order.

    ``env``: extra environment variables for the ranks (e.g. ``{"TRITON_INTERPRET": "1"}``).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, target, args, queue, dict(env or {}))) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
