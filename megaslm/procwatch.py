"""The trainer notices its launcher is gone (torch-free).

``kill -TERM <pid of the deepspeed runner>`` kills the runner alone on one node: DeepSpeed's runner forwards
signals only for its multi-node (pdsh) launch, and its per-node ``deepspeed.launcher.launch`` is not
told, so without this the trainers run on as orphans to the end of the budget, holding the GPUs. A
parent-death signal (``PR_SET_PDEATHSIG``) would only cover the immediate parent (the per-node launcher),
not the runner above it; so we record every launcher process above this one at start-up (DeepSpeed's
runner and per-node launcher, torchrun) with its start time (a recycled pid is not the same process),
and a daemon thread checks them twice a second. When one is gone, ``on_gone`` runs once: the Trainer
turns it into the same agreed stop as SIGTERM (every rank finishes the step, saves, exits 0)."""
from __future__ import annotations

import os
import threading
from typing import Callable, List, Optional, Tuple

# argv entries that mark a launcher process: a script's basename, or the module after ``-m``
_SCRIPTS = ("deepspeed", "torchrun")
_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
            "torch.distributed.launch")


def _argv(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def _stat(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()   # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def is_launcher(argv: List[str]) -> bool:
    head = argv[:3]
    if any(os.path.basename(a) in _SCRIPTS for a in head):
        return True
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1] in _MODULES for i, a in enumerate(argv[:4]))


def launcher_chain(pid: Optional[int] = None) -> List[Tuple[int, int, str]]:
    """The launcher processes above ``pid`` (default: this process), nearest first, as
    (pid, start time, command): the walk up the parents stops at the first that is not a launcher."""
    out = []
    st = _stat(pid or os.getpid())
    while st is not None and st[0] > 1:
        parent = st[0]
        argv = _argv(parent)
        st = _stat(parent)
        if not argv or st is None or not is_launcher(argv):
            break
        out.append((parent, st[1], " ".join(argv[:4])))
    return out


def gone(chain: List[Tuple[int, int, str]]) -> Optional[Tuple[int, str]]:
    """The first recorded launcher that no longer runs (pid, command), or None."""
    for pid, start, cmd in chain:
        st = _stat(pid)
        if st is None or st[1] != start:
            return pid, cmd
    return None


class LauncherWatch:
    """Check ``launcher_chain()`` every ``interval`` seconds from a daemon thread; call
    ``on_gone(pid, command)`` once when one of them has exited. Nothing to watch (a plain ``python``
    run, our test spawner) starts no thread."""

    def __init__(self, on_gone: Callable[[int, str], None], interval: float = 0.5):
        self.chain = launcher_chain()
        self.on_gone = on_gone
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        if self.chain:
            self._thread = threading.Thread(target=self._run, name="megaslm-launcher-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            hit = gone(self.chain)
            if hit is not None:
                self.on_gone(*hit)
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
