"""evidence.bench_lengths' largest-batch searches, against synthetic memory (no process is started): the GPU search
doubles then bisects to 10% in few tries; the CPU fit verifies its answer only when the measurement is affordable
(counted in model FLOPs, not timed), and otherwise says the answer is predicted."""
import math

import pytest

from evidence import bench_lengths as bl

MiB = 1 << 20


def search(fits_mb: int, capacity: int) -> tuple[int, list[int]]:
    """bench_lengths.next_try driven by a GPU whose largest micro-batch is ``capacity``."""
    lo, hi, tried = fits_mb, None, []
    while (mb := bl.next_try(lo, hi)) is not None:
        tried.append(mb)
        lo, hi = (mb, hi) if mb <= capacity else (lo, mb)
    return lo, tried


@pytest.mark.parametrize("fits_mb, capacity", [(32, 300), (8, 9), (4, 4096), (1, 1), (2, 3), (64, 1000)])
def test_gpu_search_ends_within_ten_percent_in_few_tries(fits_mb, capacity):
    found, tried = search(fits_mb, capacity)
    assert found <= capacity and found >= min(capacity, int(capacity * (1 - bl.GPU_RESOLUTION)) - 1)
    # doublings to the first failure, then about log2(1 / resolution) halvings
    assert len(tried) <= math.ceil(math.log2(2 * capacity / fits_mb)) + 5 and len(set(tried)) == len(tried)


def test_gpu_search_path():
    assert search(32, 300) == (288, [64, 128, 256, 512, 384, 320, 288, 304])


@pytest.fixture
def memory(monkeypatch):
    """_memory_isolated answering from peak = 100 MiB + micro_batch x 1 MiB; records the micro-batches asked for."""
    asked = []

    def fake(preset, vocab_size, seq_len, dtype, micro_batch, warmup_micro_batch=None, ds_config=None, ranks=1):
        asked.append(micro_batch)
        return {"seq_len": seq_len, "micro_batch": micro_batch, "peak_bytes": (100 + micro_batch) * MiB}

    monkeypatch.setattr(bl, "_memory_isolated", fake)
    return asked


def test_cpu_fit_is_verified_when_the_measurement_is_cheap(memory):
    first = {"micro_batch": 8, "peak_bytes": 108 * MiB}
    mb, checks, fixed, how = bl.max_batch_cpu("tiny", 1000, 64, "bf16", first, 400 * MiB)
    assert how == "measured" and memory == [4, mb] and checks[-1]["peak_bytes"] <= 400 * MiB * (1 - bl.CPU_HEADROOM)
    assert fixed == pytest.approx(100 * MiB) and mb == int(400 * (1 - bl.CPU_HEADROOM) - 100)


def test_cpu_fit_too_costly_to_measure_is_a_labelled_prediction(memory):
    first = {"micro_batch": 32, "peak_bytes": 132 * MiB}
    mb, checks, fixed, how = bl.max_batch_cpu("pythia-70m", 8192, 128, "bf16", first, 12 << 30)
    assert how == "predicted" and memory == [16]  # the half point only: no measurement at ~12k sequences
    assert bl.measurement_flops("pythia-70m", 8192, 128, mb) > bl.CPU_VERIFY_FLOPS
    assert mb == int(((12 << 30) * (1 - bl.CPU_HEADROOM) - 100 * MiB) // MiB)


def test_gpu_search_runs_in_one_process_over_the_process_group(monkeypatch):
    """search_max_batch itself (what each rank's process runs on a GPU), on a process group of one: the tries
    in order, each agreed over the group, with a measurement that runs out of memory above 300 sequences."""
    from launcher import steptime

    def fake(preset, vocab_size, seq_len, micro_batch, dtype, seed, warmup_micro_batch, ds_config):
        if micro_batch > 300:
            raise steptime.OutOfMemory(seq_len, "CUDA out of memory (stand-in)")
        return {"peak_bytes": micro_batch * MiB}

    monkeypatch.setattr(bl, "_measure_memory", fake)
    found = bl.search_max_batch("tiny", 1000, 64, "bf16", 32, bl.DEFAULT_DS_CONFIG)
    assert found["max_micro_batch"] == 288
    assert [(t["micro_batch"], t["fits"]) for t in found["tries"]] == [
        (64, True), (128, True), (256, True), (512, False), (384, False), (320, False), (288, True), (304, False)]
    import torch.distributed as dist
    assert not dist.is_initialized()  # the group it started is closed
