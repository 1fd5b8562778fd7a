"""The launcher's rendezvous, torch-free: a free TCP port, and this process's rank and world size from the
environment (the sweeps, the launchers -- before torch is imported -- and the tests take them from here;
the one copy)."""
from __future__ import annotations

import os
import socket
from typing import Dict


def free_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous nobody else chose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_world() -> Dict[str, int]:
    """Rank/world size from the launcher's environment (deepspeed, torchrun or our test spawner)."""
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
    }
