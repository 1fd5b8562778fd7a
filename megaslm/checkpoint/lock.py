"""One run per ``output_dir``: an exclusive lock its rank 0 holds for the whole run (torch-free).

Without it, two runs started on one directory both train to the end, log every step twice and rename
each other's intact checkpoints ``.corrupt-*``. The lock is ``flock`` on ``<output_dir>/.megaslm-run.lock``:
the kernel releases it when the holder exits, however it exits (kill -9 included), so a stale lock cannot
outlive its run and nothing has to be cleaned up. The file names the holder (pid, host, start time) for
the refusal line and for ``holder`` (the sweep's status tells a live run from an interrupted one with it).
The file itself is never removed: unlinking a lock file races with a second run opening it.

Multi-node runs keep ``output_dir`` on a shared filesystem; NFS (Linux >= 2.6.12) carries ``flock`` as a
byte-range lock across clients; Lustre needs its ``flock`` mount option (without it ``flock`` fails with
ENOSYS/EINVAL and the run says so in one line rather than running unguarded)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Dict, Optional

from megaslm.config import ConfigError

LOCK_NAME = ".megaslm-run.lock"


class RunDirInUse(ConfigError):
    """A second run on an ``output_dir`` whose lock another live process holds."""


def _describe(holder: Optional[Dict[str, Any]]) -> str:
    if not holder:
        return "a run that is just starting (its lock file names no holder yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started})"


def _read(fd: int) -> Optional[Dict[str, Any]]:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``acquire`` takes the lock or raises ``RunDirInUse`` naming the holder; ``release`` (or the
    process's exit) gives it back. A context manager too."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirInUse(f"output_dir={self.output_dir}: another run is using it, {_describe(holder)}; "
                                  "one run per output_dir: wait for it, stop it, or choose another "
                                  "output_dir") from None
            raise ConfigError(f"output_dir={self.output_dir}: cannot lock {self.path} ({e.strerror}); "
                              "the filesystem does not support flock (Lustre: mount with -o flock)") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(output_dir: str) -> Optional[Dict[str, Any]]:
    """The live run holding ``output_dir``'s lock ({pid, host, started}), or None when no run holds it
    (never started, finished, or killed: the kernel released its lock)."""
    return probe(os.path.join(output_dir, LOCK_NAME))


def probe(path: str) -> Optional[Dict[str, Any]]:
    """Whether a live process holds an exclusive ``flock`` on ``path``: what the file says of the holder
    ({} when it names none), or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read(fd) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
