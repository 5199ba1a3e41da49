"""Distributed unit tests without the launcher: ``run_distributed(fn, world_size, *args)`` runs
``fn(rank, world_size, *args)`` in fresh spawned processes joined by a real gloo process group (as OLMo-core's
``run_distributed_test``) and returns each rank's result, in rank order. ``fn`` must be a module-level function."""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

from launcher.net import free_port


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in procs:
            rank, status, value = results.get(timeout=timeout)
            (out.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}: {value}"))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
