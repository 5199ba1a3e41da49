"""Start the launcher as its users do, from a tool or a benchmark: ``python launcher/pretrain.py`` for one rank,
``deepspeed --num_gpus N launcher/pretrain.py`` for several (or when the runner itself is wanted), each on a free
rendezvous port so that concurrent runs never collide."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from launcher.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = "launcher/pretrain.py"  # relative to ROOT, the working directory of every launch


def launch_command(ranks: int = 1, runner: bool = False, env: dict | None = None) -> tuple[list[str], dict]:
    """``(command up to and including launcher/pretrain.py, environment)``; append the launcher's own arguments.

    The environment is ``env`` (default: this process's) with a loopback gloo interface unless one is set, and
    without a test fault hook that the caller did not ask for."""
    env = dict(os.environ if env is None else env)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = str(free_port())
    if ranks == 1 and not runner:
        env["MASTER_PORT"] = port
        return [sys.executable, PRETRAIN], env
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", port, PRETRAIN], env
