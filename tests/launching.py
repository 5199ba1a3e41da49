"""The launcher in tests, started as its users start it, from one argument list.

``pretrain_args``  the command line of a tiny run on the test corpus; each test adds its plan and settings
                   (a later key=value wins).
``launch``         those arguments in a subprocess: ``python launcher/pretrain.py`` on one rank, the deepspeed runner
                   (``deepspeed --num_gpus N``) for several. Tests get it as the ``launch`` fixture, which marks
                   them ``slow``.
``run_in_process`` ``launcher.pretrain.main`` in this process as rank 0 of 1 (gloo on loopback): the fast loop's way.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from evidence.launch import PRETRAIN, launch_command
from launcher.net import free_port

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "ds_configs" / "zero2.json"
# set by the caller when wanted (fault=...), never inherited from the environment a test left behind
_NOT_INHERITED = ("GROWLENGTH_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


def pretrain_args(run_dir, prefix, tokenizer, *extra: str, ds_config=ZERO2, cache_dir=None) -> list[str]:
    """``--ds_config`` and the run's key=value settings: the run directory, the corpus and its tokenizer, a sample
    index cache beside the run (or ``cache_dir``), 10% validation, a step line per step, no TensorBoard; then
    ``extra``."""
    cache = cache_dir if cache_dir is not None else Path(run_dir).parent / "index-cache"
    return ["--ds_config", str(ds_config), f"run_dir={run_dir}", f"data.prefix={prefix}", f"data.tokenizer={tokenizer}",
            f"data.cache_dir={cache}", "data.valid_fraction=0.1", "logging.log_interval=1",
            "logging.tensorboard=false", *extra]


def launch(args: list[str], ranks: int = 1, runner: bool = False, fault: str | None = None, cwd=ROOT,
           script=None, env: dict | None = None, wait: bool = True, timeout: float = 600):
    """The launcher with ``args`` in a subprocess started from ``cwd``: ``python launcher/pretrain.py`` for one rank,
    ``deepspeed --num_gpus RANKS`` for several or with ``runner``; ``script`` takes the place of launcher/pretrain.py
    (a test's wrapper around ``pretrain.main``), ``env`` adds variables and ``fault`` sets ``GROWLENGTH_FAULT``; the
    ranks share the cores.

    Returns the finished process with its output captured (``timeout`` seconds at most), or with ``wait=False`` the
    running ``Popen`` in a session of its own, stdout and stderr together in ``proc.stdout``."""
    base = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    base.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)), **(env or {}))
    if fault:
        base["GROWLENGTH_FAULT"] = fault
    cmd, env = launch_command(ranks, runner=runner, env=base, script=str(script or ROOT / PRETRAIN))
    cmd += [str(a) for a in args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_in_process(args: list[str], **main_kwargs) -> int:
    """``launcher.pretrain.main(args)`` in this process as rank 0 of 1 (gloo on loopback, a free port): its exit
    code. The process environment is restored afterwards; a ``GROWLENGTH_FAULT`` the test set applies."""
    from launcher import pretrain

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}.items():
            mp.setenv(key, value)
        return pretrain.main([str(a) for a in args], **main_kwargs)
