"""Rendezvous ports (standard library only: tools, tests and benchmarks use it without importing DeepSpeed)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice), for a rendezvous that starts next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
