"""Start the launcher as its users do, from a tool or a benchmark: ``python launcher/pretrain.py`` for one rank,
the deepspeed runner for several (or when the runner itself is wanted), each on a free rendezvous port so that
concurrent runs never collide, on the GPUs this process was given (``CUDA_VISIBLE_DEVICES``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from evidence.runs import EvidenceError
from launcher.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = "launcher/pretrain.py"  # relative to ROOT, the working directory of every launch


def runner_devices(ranks: int, env: dict) -> list[str]:
    """The deepspeed runner's device arguments for ``ranks`` ranks on this node.

    The runner honours ``CUDA_VISIBLE_DEVICES`` only when it gets none of --num_gpus/--include/--exclude/hostfile;
    with --num_gpus N it drops the variable and gives the ranks devices 0..N-1 of the whole machine. So when the
    variable lists devices, the ranks get the first ``ranks`` of them by index (``--include localhost:4,5``);
    otherwise ``--num_gpus N``."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible in ("", "-1", "NoDevFiles"):
        return ["--num_gpus", str(ranks)]
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    if not all(d.isdigit() for d in ids):
        raise EvidenceError(f"CUDA_VISIBLE_DEVICES={visible}: the deepspeed runner selects GPUs by index; set it to "
                            f"indices (nvidia-smi -L lists them) or run one rank")
    if ranks > len(ids):
        raise EvidenceError(f"{ranks} ranks but CUDA_VISIBLE_DEVICES={visible} shows {len(ids)} GPU(s): lower the "
                            f"ranks or make more GPUs visible")
    return ["--include", "localhost:" + ",".join(ids[:ranks])]


def launch_command(ranks: int = 1, runner: bool = False, env: dict | None = None,
                   script: str = PRETRAIN) -> tuple[list[str], dict]:
    """``(command up to and including the script, environment)``; append the launcher's own arguments.

    ``script`` (default launcher/pretrain.py) is run relative to ROOT. The environment is ``env`` (default: this
    process's) with a loopback gloo interface unless one is set."""
    env = dict(os.environ if env is None else env)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = str(free_port())
    if ranks == 1 and not runner:
        env["MASTER_PORT"] = port
        return [sys.executable, script], env
    deepspeed = Path(sys.executable).parent / "deepspeed"
    runner_cmd = [str(deepspeed)] if deepspeed.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return runner_cmd + runner_devices(ranks, env) + ["--master_port", port, script], env
