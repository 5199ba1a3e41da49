"""Step time per sequence length, measured so that one slow step on a shared machine cannot decide the answer.

The one measurer behind `evidence.bench_lengths`, the `time_share` probe and `evidence.compare`'s calibration:
warm-up at every length, then lengths interleaved in rounds in one process; per length the median, min, max and
max/min (above `NOISY_SPREAD`: flagged, with a warning), and the ratio to a reference length paired per round.
`clock` and `synchronize` are injected (on CUDA pass `torch.cuda.synchronize`). No torch import at module level.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

NOISY_SPREAD = 1.2  # max/min of one length's timed steps above which the length is flagged

# allocator failures that torch raises as a plain RuntimeError (CPU allocator, cuBLAS workspace, older builds)
_ALLOCATOR_MESSAGES = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


class OutOfMemory(RuntimeError):
    """A step (or the model it needs) did not fit in memory at ``seq_len``; ``detail`` is the allocator's line."""

    def __init__(self, seq_len: int | None, detail: str):
        super().__init__(f"out of memory at seq_len {seq_len}: {detail}")
        self.seq_len, self.detail = seq_len, detail


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``torch.cuda.OutOfMemoryError`` (torch 2.1 has no
    ``torch.OutOfMemoryError``), Python's MemoryError, or an allocator RuntimeError."""
    import torch
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None),
                              MemoryError) if k is not None)
    if isinstance(exc, kinds):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATOR_MESSAGES)


def run_guarded(fn: Callable[[], object], seq_len: int | None = None):
    """``fn()``, with an allocation failure turned into :class:`OutOfMemory` (raised outside the handler, so the
    failed step's tensors, held by the original traceback, are freed before the caller decides what to do)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - only allocation failures are converted, the rest re-raised
        if not is_out_of_memory(e):
            raise
        lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[0][:300]
    raise OutOfMemory(seq_len, detail)


@dataclass(frozen=True)
class LengthTimes:
    """Timed steps of one length, one tuple of seconds per round."""

    seq_len: int
    rounds: tuple[tuple[float, ...], ...]

    @property
    def samples(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """max/min of the timed steps (1.0 = every step took the same time)."""
        lo, hi = self.min, self.max
        return hi / lo if lo > 0 else (1.0 if hi == 0 else float("inf"))

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]


@dataclass(frozen=True)
class StepTimes:
    """Per-length timings of one interleaved measurement; ratios are to ``reference`` (the longest length)."""

    lengths: dict[int, LengthTimes]
    reference: int

    def median(self, seq_len: int) -> float:
        return self.lengths[seq_len].median

    def medians(self) -> list[float]:
        return [t.median for t in self.lengths.values()]

    def ratio(self, seq_len: int) -> float:
        return self.median(seq_len) / self.median(self.reference)

    def ratio_range(self, seq_len: int) -> tuple[float, float]:
        """Lowest and highest per-round ratio (this length's median in a round / the reference's in that round)."""
        ref = self.lengths[self.reference].round_medians()
        per_round = [a / b for a, b in zip(self.lengths[seq_len].round_medians(), ref)]
        return min(per_round), max(per_round)

    def noisy(self) -> list[int]:
        return [L for L, t in self.lengths.items() if t.noisy]

    def warning(self, fix: str = "raise --repeats (or measure on a quiet machine) before trusting the ratios"
                ) -> str | None:
        """One line for the log when some length's steps varied by more than NOISY_SPREAD, else None."""
        bad = self.noisy()
        if not bad:
            return None
        worst = ", ".join(f"L={L} {self.lengths[L].spread:.2f}x" for L in bad)
        rounds = len(self.lengths[bad[0]].rounds)
        return (f"noisy machine: step times varied by more than {NOISY_SPREAD:g}x (max/min) at {worst} over "
                f"{rounds} interleaved round(s); the medians hold against a few slow steps, but {fix}")

    def row(self, seq_len: int) -> dict:
        """The JSON fields of one length."""
        t = self.lengths[seq_len]
        lo, hi = self.ratio_range(seq_len)
        return {"step_s": t.median, "step_s_min": t.min, "step_s_max": t.max, "step_s_spread": t.spread,
                "step_time_ratio": self.ratio(seq_len), "step_time_ratio_min": lo, "step_time_ratio_max": hi,
                "timed_steps": len(t.samples), "noisy": t.noisy}


def summarize(rounds: list[dict[int, list[float]]], reference: int | None = None) -> StepTimes:
    """StepTimes from ``[{seq_len: [seconds, ...]} per round]``; every round must time every length."""
    if not rounds or not rounds[0]:
        raise ValueError("no timed steps to summarize")
    keys = list(rounds[0])
    for i, r in enumerate(rounds):
        if list(r) != keys or not all(r[k] for k in keys):
            raise ValueError(f"round {i} times {sorted(r)} but round 0 times {sorted(keys)}: every round must "
                             f"time every length at least once")
    lengths = {k: LengthTimes(k, tuple(tuple(r[k]) for r in rounds)) for k in keys}
    return StepTimes(lengths, max(keys) if reference is None else reference)


def measure(steps: dict[int, Callable[[], object]], rounds: int = 3, steps_per_round: int = 1, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter,
            synchronize: Callable[[], object] | None = None) -> StepTimes:
    """Time ``steps[seq_len]()`` interleaved: ``warmup`` untimed calls per length, then ``rounds`` rounds, each
    calling every length ``steps_per_round`` times in turn (A A B B C C, A A B B C C, ...).

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before every clock read. An allocation failure in a
    step is raised as :class:`OutOfMemory` naming the length."""
    if rounds < 1 or steps_per_round < 1 or warmup < 0:
        raise ValueError(f"rounds {rounds} and steps_per_round {steps_per_round} must be >= 1, warmup {warmup} >= 0")
    sync = synchronize or (lambda: None)
    for seq_len, step in steps.items():
        for _ in range(warmup):
            run_guarded(step, seq_len)
    timed = []
    for _ in range(rounds):
        this = {}
        for seq_len, step in steps.items():
            times = []
            for _ in range(steps_per_round):
                sync()
                t0 = clock()
                run_guarded(step, seq_len)
                sync()
                times.append(clock() - t0)
            this[seq_len] = times
        timed.append(this)
    return summarize(timed)


def table(times: StepTimes) -> str:
    """One line per length: median, min-max, spread and the ratio with its range; noisy lengths marked ``!``."""
    lines = [f"{'seq_len':>7} {'median s':>9} {'min-max s':>17} {'max/min':>7} {'ratio':>6} {'ratio range':>11}"]
    for L, t in times.lengths.items():
        lo, hi = times.ratio_range(L)
        span, flag = f"{t.min:.4f}-{t.max:.4f}", "!" if t.noisy else " "
        lines.append(f"{L:>7} {t.median:>9.4f} {span:>17} {t.spread:>6.2f}{flag} {times.ratio(L):>6.2f} "
                     f"{f'{lo:.2f}-{hi:.2f}':>11}")
    return "\n".join(lines)
