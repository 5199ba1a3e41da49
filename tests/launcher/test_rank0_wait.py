"""Rank 0's long start-up work (the sample index of a large corpus) under a short collective timeout, on 2 real gloo
ranks: the others wait on the rank-0 group's own timeout, not in a barrier of the main group; an error on rank 0 is
raised on every rank. The plain barrier is the control: with the same short timeout it fails."""
import os
import time

import pytest

from launcher.net import free_port

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
    done = []  # when rank 0's work ended (CLOCK_MONOTONIC: one clock for every process of the machine)

    def work():
        time.sleep(SLOW_S)
        done.append(time.monotonic())

    if mode == "wait":
        distributed.wait_for_rank0(work, rank, world)
    else:  # what build_index did before: rank 0 works, the others sit in a barrier of the main group
        if rank == 0:
            work()
        distributed.barrier()
    went_on = time.monotonic()
    total = distributed.all_reduce_sum([1.0])[0]  # the main group is still usable

    def broken():
        raise DatasetError("PREFIX.bin: truncated; preprocess again")

    try:
        distributed.wait_for_rank0(broken, rank, world)
        message = None
    except DatasetError as e:
        message = str(e)
    ds.close()
    return done, went_on, total, message


def test_slow_rank0_work_outlasts_the_collective_timeout(run_distributed):
    results = run_distributed(_slow_rank0, 2, free_port(), "wait", timeout=240)
    [work_ended], _, _, _ = results[0]
    _, rank1_went_on, _, _ = results[1]
    # rank 1 went on only once rank 0's work (7 s, past the 3 s collective timeout) had ended, without an error;
    # an order of events, so it holds however slowly either process was scheduled
    assert rank1_went_on >= work_ended
    for _, _, total, message in results:
        assert total == 2.0  # the main group still works
        assert message == "PREFIX.bin: truncated; preprocess again"  # on rank 1 too, not a hang


def test_control_a_plain_barrier_times_out(run_distributed):
    with pytest.raises(AssertionError, match=r"(?i)timed? ?out|timeout"):
        run_distributed(_slow_rank0, 2, free_port(), "barrier", timeout=240)
