"""A free TCP port (torch-free: the sweeps, the launchers and the tests take it from here; the one copy)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous nobody else chose)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
