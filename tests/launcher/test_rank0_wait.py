"""Rank 0's long start-up work (the sample index of a large corpus) under a short collective timeout, on 2 real gloo
ranks: the others wait on the rank-0 group's own timeout, not in a barrier of the main group; an error on rank 0 is
raised on every rank. The plain barrier is the control: with the same short timeout it fails."""
import os
import time

import pytest

from launcher.net import free_port

from distributed import run_distributed

DIST_TIMEOUT_MIN = 0.05  # 3 s
SLOW_S = 7.0


def _restart(port: int) -> None:
    """Drop run_distributed's process group and start ours, as the launcher does, with a 3 s collective timeout."""
    import torch.distributed as dist
    dist.destroy_process_group()
    os.environ.update(MASTER_PORT=str(port), GROWLENGTH_DIST_TIMEOUT_MIN=str(DIST_TIMEOUT_MIN),
                      GROWLENGTH_RANK0_TIMEOUT_MIN="1")
    from launcher import engine as ds
    ds.init_distributed()


def _slow_rank0(rank, world, port, mode):
    from data_pipeline.errors import DatasetError
    from launcher import distributed
    from launcher import engine as ds
    _restart(port)
    t0 = time.monotonic()
    if mode == "wait":
        distributed.wait_for_rank0(lambda: time.sleep(SLOW_S), rank, world)
    else:  # what build_index did before: rank 0 works, the others sit in a barrier of the main group
        if rank == 0:
            time.sleep(SLOW_S)
        distributed.barrier()
    waited = time.monotonic() - t0
    total = distributed.all_reduce_sum([1.0])[0]  # the main group is still usable

    def broken():
        raise DatasetError("PREFIX.bin: truncated; preprocess again")

    try:
        distributed.wait_for_rank0(broken, rank, world)
        message = None
    except DatasetError as e:
        message = str(e)
    ds.close()
    return waited, total, message


def test_slow_rank0_work_outlasts_the_collective_timeout():
    results = run_distributed(_slow_rank0, 2, free_port(), "wait", timeout=240)
    for waited, total, message in results:
        assert waited >= SLOW_S - 0.5 and total == 2.0
        assert message == "PREFIX.bin: truncated; preprocess again"  # on rank 1 too, not a hang


def test_control_a_plain_barrier_times_out():
    with pytest.raises(AssertionError, match=r"(?i)timed? ?out|timeout"):
        run_distributed(_slow_rank0, 2, free_port(), "barrier", timeout=240)
