"""StageLoader: disjoint rank slices, exact resume mid-stage and at a boundary, micro-batch changes."""
import threading
import time

import numpy as np
import pytest
import torch

from data_pipeline.errors import SamplePlanError
from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.loader import StageLoader
from data_pipeline.samples import GrowLengthSamples

PLAN = [(4, 4 * 48), (8, 8 * 24)]  # stage 0: 48 samples, stage 1: 24 samples


@pytest.fixture
def samples(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 500, size=int(n)).tolist() + [2] for n in rng.integers(1, 30, size=60)]
    return GrowLengthSamples(write_dataset(str(tmp_path / "d"), docs), PLAN, seed=11)


def run(samples, stage, mbs, accum, rank, world, consumed=0):
    return [[mb.clone() for mb in step] for step in StageLoader(samples, stage, mbs, accum, rank, world, consumed)]


def test_shapes_and_sample_order(samples):
    steps = run(samples, 0, mbs=3, accum=2, rank=0, world=1)
    assert len(steps) == 8 and all(len(s) == 2 for s in steps)
    mb = steps[0][0]
    assert mb.dtype == torch.int64 and mb.shape == (3, 5)
    flat = torch.cat([mb for step in steps for mb in step]).numpy()
    assert np.array_equal(flat, samples.samples(0, np.arange(48)))  # single rank: the shuffled order itself


def test_disjoint_rank_slices_cover_global_batch(samples):
    world, mbs, accum = 2, 2, 3
    per_rank = [run(samples, 0, mbs, accum, r, world) for r in range(world)]
    for step in range(4):
        seen = np.concatenate([torch.cat(per_rank[r][step]).numpy() for r in range(world)])
        expected = samples.samples(0, np.arange(step * 12, (step + 1) * 12))
        assert sorted(map(tuple, seen)) == sorted(map(tuple, expected))
        # micro-step m: rank r gets [m*mbs*W + r*mbs, +mbs)
        assert np.array_equal(per_rank[1][step][2].numpy(), samples.samples(0, step * 12 + np.array([10, 11])))


@pytest.mark.parametrize("stop_after", [1, 3, 4])  # 4 = exactly at the stage boundary
def test_resume_equals_uninterrupted(samples, stop_after):
    world = 2
    for rank in range(world):
        uninterrupted = run(samples, 0, 2, 3, rank, world) + run(samples, 1, 1, 6, rank, world)
        loader = StageLoader(samples, 0, 2, 3, rank, world)
        got, state = [], None
        for i, step in enumerate(loader):
            got.append([mb.clone() for mb in step])
            if i + 1 == stop_after:
                state = loader.state_dict()
                break
        assert state == {"stage": 0, "consumed_samples": 12 * stop_after}
        restored = StageLoader.from_state_dict(samples, state, 2, 3, rank, world)
        got += [[mb.clone() for mb in step] for step in restored]
        assert restored.exhausted and len(restored) == 0
        got += run(samples, 1, 1, 6, rank, world)  # next stage: new loader, different micro-batch size
        assert len(got) == len(uninterrupted)
        assert all(torch.equal(a, b) for x, y in zip(got, uninterrupted) for a, b in zip(x, y))


def test_stage_boundary_state_of_next_stage(samples):
    a = run(samples, 1, 2, 1, 0, 1)
    b = StageLoader.from_state_dict(samples, {"stage": 1, "consumed_samples": 0}, 2, 1, 0, 1)
    assert len(b) == b.num_steps == 12
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_errors(samples):
    with pytest.raises(SamplePlanError, match=r"stage 0: 48 samples \(seq_len 4\) is not a multiple of the global "
                                              r"batch micro_batch 5 \* grad_accum 1 \* ranks 2 = 10: 48 = 4 \* 10 "
                                              r"\+ 8; make the stage's tokens a multiple of 40"):
        StageLoader(samples, 0, 5, 1, 0, 2)
    with pytest.raises(SamplePlanError, match=r"consumed_samples 6: must be a multiple of the global batch 12 in "
                                              r"\[0, 48\]"):
        StageLoader(samples, 0, 2, 3, 0, 2, consumed_samples=6)
    with pytest.raises(SamplePlanError, match=r"consumed_samples 60: must be a multiple"):
        StageLoader(samples, 0, 2, 3, 0, 2, consumed_samples=60)
    with pytest.raises(SamplePlanError, match=r"rank 2: must be in \[0, world_size 2\)"):
        StageLoader(samples, 0, 2, 3, 2, 2)
    with pytest.raises(SamplePlanError, match="micro_batch_size 0: must be a positive integer"):
        StageLoader(samples, 0, 0, 3, 0, 2)
    with pytest.raises(SamplePlanError, match=r"missing keys \['consumed_samples'\]"):
        StageLoader.from_state_dict(samples, {"stage": 0}, 2, 3, 0, 2)


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("growlength-prefetch")]


@pytest.mark.parametrize("prefetch", [1, 2, 5])
@pytest.mark.parametrize("stop_after", [1, 3, 4])  # 4 = exactly at the stage boundary
def test_prefetched_batches_equal_serial_across_resume_and_switch(samples, prefetch, stop_after):
    world = 2
    for rank in range(world):
        serial = run(samples, 0, 2, 3, rank, world) + run(samples, 1, 1, 6, rank, world)
        loader = StageLoader(samples, 0, 2, 3, rank, world, prefetch=prefetch)
        got = []
        for i, step in enumerate(loader):
            got.append([mb.clone() for mb in step])
            if i + 1 == stop_after:
                break
        time.sleep(0.05)  # let the thread read ahead as far as the queue allows
        # the position served, not the position read: a checkpoint here resumes at the next step
        assert loader.state_dict() == {"stage": 0, "consumed_samples": 12 * stop_after}
        loader.close()
        assert prefetch_threads() == []
        restored = StageLoader.from_state_dict(samples, loader.state_dict(), 2, 3, rank, world, prefetch=prefetch)
        got += [[mb.clone() for mb in step] for step in restored]
        assert restored.exhausted and prefetch_threads() == []  # the stage's end ends the thread
        nxt = StageLoader(samples, 1, 1, 6, rank, world, prefetch=prefetch)  # the switch: other micro-batch size
        got += [[mb.clone() for mb in step] for step in nxt]
        assert len(got) == len(serial) == 4 + 2
        assert all(torch.equal(a, b) for x, y in zip(got, serial) for a, b in zip(x, y))


def test_prefetch_reads_ahead_and_close_joins(samples):
    loader = StageLoader(samples, 0, 1, 1, 0, 1, prefetch=3)  # 48 steps of one sample
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 120  # ends a hang only: the loop leaves as soon as the thread is 3 steps ahead
    while it._queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert it._queue.qsize() == 3  # bounded: three steps ahead, no more
    assert loader.state_dict()["consumed_samples"] == 1
    assert prefetch_threads() == ["growlength-prefetch-stage0-rank0"]
    loader.close()
    assert prefetch_threads() == []
    with pytest.raises(StopIteration):
        next(it)
    rest = [s[0].clone() for s in loader]  # iterating again starts at the served position
    assert len(rest) == 47 and torch.equal(rest[0], torch.from_numpy(samples.samples(0, [1])))
    assert prefetch_threads() == []


def test_prefetch_thread_error_reaches_the_caller(samples, monkeypatch):
    loader = StageLoader(samples, 0, 2, 3, 0, 2, prefetch=2)

    def torn(stage, indices):  # the memmap read failing mid-stage (e.g. an I/O error on the .bin)
        if int(np.min(indices)) >= 12:
            raise OSError("Input/output error")
        return GrowLengthSamples.samples(samples, stage, indices)

    monkeypatch.setattr(samples, "samples", torn)
    it = iter(loader)
    next(it)
    with pytest.raises(OSError, match="Input/output error"):
        next(it)
    loader.close()
    assert prefetch_threads() == [] and loader.state_dict()["consumed_samples"] == 12


def test_prefetch_error(samples):
    with pytest.raises(SamplePlanError, match=r"prefetch -1: must be a non-negative integer"):
        StageLoader(samples, 0, 2, 3, 0, 2, prefetch=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches(samples):
    loader = StageLoader(samples, 0, 2, 3, 0, 2, prefetch=2, pin_memory=True)
    step = next(iter(loader))
    assert all(mb.is_pinned() for mb in step)
    assert torch.equal(step[0], run(samples, 0, 2, 3, 0, 2)[0][0])
    loader.close()
