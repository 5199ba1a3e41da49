"""launcher.steptime on a fake clock: the steps cost exactly what the test says, so medians, ratios, spreads and the
noisy flag have exact expected values; plus the CUDA synchronise placement and out-of-memory recognition."""
import pytest
import torch

from launcher import steptime

COST = {128: 1.0, 512: 2.0, 1024: 4.0}  # seconds per step by length


class FakeClock:
    """A clock that only moves when a step says so; ``slow`` maps a call number (0-based, over all steps) to the
    seconds that one call takes instead of its length's cost."""

    def __init__(self, slow: dict[int, float] | None = None):
        self.now, self.calls, self.slow, self.order = 0.0, 0, slow or {}, []

    def __call__(self) -> float:
        return self.now

    def step(self, seq_len: int):
        def run():
            self.order.append(seq_len)
            self.now += self.slow.get(self.calls, COST[seq_len])
            self.calls += 1
        return run


def measure(clock, **kw):
    return steptime.measure({L: clock.step(L) for L in COST}, clock=clock, **kw)


def test_one_slow_step_moves_neither_median_nor_ratio_and_is_flagged():
    quiet = measure(FakeClock(), rounds=3, steps_per_round=1)
    # call 3 + 1 = the 128 step of round 1 (3 warm-up calls first, then 128, 512, 1024 per round) takes 5x
    clock = FakeClock(slow={3 + 3: 5.0})
    noisy = measure(clock, rounds=3, steps_per_round=1)
    assert clock.order[6] == 128 and noisy.lengths[128].samples == [1.0, 5.0, 1.0]
    for L in COST:
        assert noisy.median(L) == quiet.median(L) == COST[L]
        assert noisy.ratio(L) == quiet.ratio(L) == COST[L] / COST[1024]
    assert quiet.noisy() == [] and quiet.warning() is None
    assert noisy.lengths[128].spread == 5.0 and noisy.noisy() == [128]
    # the ratio's spread: round 1 paired a 5 s step at 128 with a 4 s step at 1024
    assert noisy.ratio_range(128) == (0.25, 1.25) and quiet.ratio_range(128) == (0.25, 0.25)
    assert noisy.ratio_range(512) == (0.5, 0.5)
    warning = noisy.warning()
    assert "noisy machine" in warning and "L=128 5.00x" in warning and "--repeats" in warning
    row = noisy.row(128)
    assert row["noisy"] and row["step_s"] == 1.0 and row["step_s_max"] == 5.0 and row["step_time_ratio"] == 0.25
    assert row["step_time_ratio_max"] == 1.25 and row["timed_steps"] == 3
    assert not noisy.row(1024)["noisy"] and "!" in steptime.table(noisy).splitlines()[1]


def test_several_steps_per_round_keep_the_round_ratio_too():
    """With 3 steps per round, the slow step is outvoted inside its round: even the ratio's range does not move,
    while the spread still shows it."""
    clock = FakeClock(slow={3 + 1: 9.0})  # the second 128 step of round 0
    t = measure(clock, rounds=2, steps_per_round=3)
    assert t.median(128) == 1.0 and t.ratio(128) == 0.25 and t.ratio_range(128) == (0.25, 0.25)
    assert t.lengths[128].spread == 9.0 and t.noisy() == [128]


def test_interleaved_order_after_a_warmup_that_is_not_timed():
    clock = FakeClock(slow={0: 100.0})  # the first warm-up call (kernels, caches) is slow and must not count
    t = measure(clock, rounds=2, steps_per_round=2, warmup=1)
    assert clock.order == [128, 512, 1024] + [128, 128, 512, 512, 1024, 1024] * 2
    assert t.lengths[128].max == 1.0 and t.noisy() == []


def test_synchronize_runs_before_each_clock_read():
    """A fake asynchronous device: a step only queues its work, synchronize() runs it (moves the clock). Timed
    without synchronize, steps look free (kernel launches); with it, each step gets exactly its own cost."""
    class Device:
        def __init__(self):
            self.now, self.queued = 0.0, 0.0

        def clock(self):
            return self.now

        def step(self, seq_len):
            def run():
                self.queued += COST[seq_len]
            return run

        def synchronize(self):
            self.now, self.queued = self.now + self.queued, 0.0

    dev = Device()
    synced = steptime.measure({L: dev.step(L) for L in COST}, clock=dev.clock, synchronize=dev.synchronize)
    assert synced.medians() == [1.0, 2.0, 4.0]
    dev = Device()
    unsynced = steptime.measure({L: dev.step(L) for L in COST}, clock=dev.clock)
    assert unsynced.medians() == [0.0, 0.0, 0.0]


def test_summarize_needs_every_length_in_every_round():
    with pytest.raises(ValueError, match=r"round 1 times \[128\] but round 0 times \[128, 256\]"):
        steptime.summarize([{128: [1.0], 256: [2.0]}, {128: [1.0]}])
    with pytest.raises(ValueError, match="no timed steps"):
        steptime.summarize([])
    with pytest.raises(ValueError, match="must be >= 1"):
        steptime.measure({1: lambda: None}, rounds=0)


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
])
def test_allocation_failures_become_out_of_memory_naming_the_length(exc):
    def step():
        raise exc
    with pytest.raises(steptime.OutOfMemory, match="out of memory at seq_len 512") as info:
        steptime.measure({128: lambda: None, 512: step})
    assert info.value.seq_len == 512 and "\n" not in info.value.detail and info.value.__context__ is None


def test_real_cpu_allocator_failure_is_out_of_memory_and_other_errors_pass_through():
    with pytest.raises(steptime.OutOfMemory, match="can't allocate memory"):
        steptime.run_guarded(lambda: torch.empty(1 << 50, dtype=torch.int64), 64)  # 8 PiB: refused at once
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        steptime.run_guarded(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")), 64)
    assert not isinstance(info.value, steptime.OutOfMemory)


# ---- the launcher's time_share probe (launcher.modeling.probe_step_times) on one gloo rank, in process ------------------------
@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo process group started the launcher's way (engine.init_distributed), torn down after."""
    import socket
    from launcher import engine
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(key, value)
    engine.init_distributed()
    try:
        yield
    finally:
        engine.close()


def probe(tokens_per_step: int, seq_lens: list[int]) -> list[float]:
    from launcher.modeling import probe_step_times
    from launcher.plan import build_plan
    from model import ModelConfig
    stages = build_plan(seq_lens, [1] * len(seq_lens), tokens_per_step, world_size=1).stages  # accumulation 1
    return probe_step_times(ModelConfig.from_preset("tiny", vocab_size=300), 0, list(stages))


def test_time_share_probe_gives_interleaved_medians(one_rank, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="growlength"):
        times = probe(512, [32, 64])
    assert len(times) == 2 and all(t > 0 for t in times)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step-time probe:"))
    assert f"L=32: {times[0]:.6f}s, L=64: {times[1]:.6f}s (median of 3 rounds; max/min " in line


def test_time_share_probe_out_of_memory_is_a_config_error(one_rank):
    """2**38 tokens per step at L=32 is a (2**33, 33) int64 batch, 2.2 TB: the real CPU allocator refuses it."""
    from launcher.config import ConfigError
    with pytest.raises(ConfigError, match=r"step-time probe for time_share stages ran out of memory at seq_len 32 "
                                          r"\(.*can't allocate memory.*\): lower "
                                          r"growlength.max_tokens_per_micro_batch"):
        probe(1 << 38, [32, 64])



def test_spread_is_max_over_min_of_all_timed_steps():
    t = steptime.LengthTimes(256, ((2.0, 1.0), (4.0,)))
    assert (t.min, t.median, t.max, t.spread, t.noisy) == (1.0, 2.0, 4.0, 4.0, True)
    assert steptime.LengthTimes(256, ((1.0, 1.2),)).noisy is False  # 1.2 is the limit, not above it


def test_cuda_out_of_memory_is_recognised_by_class_on_torch_2_1(monkeypatch):
    """torch 2.1 has torch.cuda.OutOfMemoryError but no torch.OutOfMemoryError; the class decides, not the text."""
    err = torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB")
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    assert steptime.is_out_of_memory(err)
