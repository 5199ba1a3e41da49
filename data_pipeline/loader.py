"""Per-rank micro-batches of one GrowLength stage: for each optimizer step, this rank's `grad_accum` micro-batches.

The global batch is `micro_batch_size * grad_accum * world_size` consecutive samples of the stage's shuffled order.
The position `{"stage": k, "consumed_samples": n}` counts whole steps served; `StageLoader.from_state_dict` resumes
to exactly the batches an uninterrupted loader would yield. `prefetch=N` reads ahead in a thread without changing
the batches, their order or the position.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, NamedTuple

import numpy as np
import torch

from data_pipeline.errors import SamplePlanError
from data_pipeline.samples import GrowLengthSamples, WindowStream


class MicroBatch(NamedTuple):
    """A micro-batch with its document boundaries (what StageLoader(documents=True) yields)."""

    tokens: torch.Tensor      # (mbs, seq_len + 1) int64: inputs and shifted labels
    cu_seqlens: torch.Tensor  # (m + 1,) int32 document starts over the mbs * seq_len flattened inputs, CPU


class StageLoader:
    """Iterate optimizer steps of one stage: each item is a list of `grad_accum` LongTensors (mbs, seq_len + 1),
    or of `MicroBatch`es with their document boundaries when `documents` (for document masking)."""

    def __init__(self, samples: GrowLengthSamples, stage: int, micro_batch_size: int, grad_accum: int, rank: int,
                 world_size: int, consumed_samples: int = 0, documents: bool = False, prefetch: int = 0,
                 pin_memory: bool = False):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                            ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise SamplePlanError(f"{name} {value!r}: must be a positive integer")
        if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise SamplePlanError(f"prefetch {prefetch!r}: must be a non-negative integer (steps read ahead; 0 = none)")
        if not 0 <= rank < world_size:
            raise SamplePlanError(f"rank {rank}: must be in [0, world_size {world_size})")
        self.samples, self.stage = samples, int(stage)
        self.micro_batch_size, self.grad_accum = int(micro_batch_size), int(grad_accum)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seq_len = samples.seq_len(self.stage)
        self.num_samples = samples.num_samples(self.stage)
        self.global_batch_size = self.micro_batch_size * self.grad_accum * self.world_size
        if self.num_samples % self.global_batch_size:
            q, r = divmod(self.num_samples, self.global_batch_size)
            raise SamplePlanError(
                f"stage {self.stage}: {self.num_samples} samples (seq_len {self.seq_len}) is not a multiple of the "
                f"global batch micro_batch {self.micro_batch_size} * grad_accum {self.grad_accum} * ranks "
                f"{self.world_size} = {self.global_batch_size}: {self.num_samples} = {q} * "
                f"{self.global_batch_size} + {r}; make the stage's tokens a multiple of "
                f"{self.global_batch_size * self.seq_len}")
        if (not 0 <= consumed_samples <= self.num_samples) or consumed_samples % self.global_batch_size:
            raise SamplePlanError(
                f"consumed_samples {consumed_samples}: must be a multiple of the global batch "
                f"{self.global_batch_size} in [0, {self.num_samples}] for stage {self.stage}; was the checkpoint "
                f"written with a different batch layout?")
        self.consumed_samples = int(consumed_samples)  # served to the caller, at whole steps
        self.documents = bool(documents)
        self.prefetch, self.pin_memory = int(prefetch), bool(pin_memory)
        self._prefetcher: _Prefetcher | None = None

    @classmethod
    def from_state_dict(cls, samples: GrowLengthSamples, state: dict, micro_batch_size: int, grad_accum: int,
                        rank: int, world_size: int, **kwargs) -> "StageLoader":
        """Rebuild a loader at a saved position (see `state_dict`)."""
        missing = {"stage", "consumed_samples"} - set(state)
        if missing:
            raise SamplePlanError(f"loader state {state!r}: missing keys {sorted(missing)}")
        return cls(samples, int(state["stage"]), micro_batch_size, grad_accum, rank, world_size,
                   int(state["consumed_samples"]), **kwargs)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "consumed_samples": self.consumed_samples}

    @property
    def num_steps(self) -> int:
        """Optimizer steps in the whole stage."""
        return self.num_samples // self.global_batch_size

    def __len__(self) -> int:
        """Optimizer steps left."""
        return (self.num_samples - self.consumed_samples) // self.global_batch_size

    @property
    def exhausted(self) -> bool:
        return self.consumed_samples >= self.num_samples

    def step_indices(self, step_start: int) -> np.ndarray:
        """This rank's sample indices for the step starting at global sample `step_start`: (grad_accum, mbs)."""
        mbs, world = self.micro_batch_size, self.world_size
        micro = np.arange(self.grad_accum, dtype=np.int64)[:, None] * (mbs * world)
        return step_start + micro + self.rank * mbs + np.arange(mbs, dtype=np.int64)[None, :]

    def read_step(self, step_start: int) -> list:
        """This rank's micro-batches of the step starting at global sample ``step_start``: grad_accum LongTensors
        (mbs, seq_len + 1), views of one (pinned, when ``pin_memory``) buffer; with ``documents``, each as a
        ``MicroBatch`` with its document boundaries."""
        idx = self.step_indices(step_start)                        # (grad_accum, mbs)
        batch = self.samples.samples(self.stage, idx.reshape(-1))  # (grad_accum * mbs, L+1)
        batch = torch.from_numpy(batch).view(self.grad_accum, self.micro_batch_size, self.seq_len + 1)
        if self.pin_memory:
            batch = batch.pin_memory()
        if not self.documents:
            return list(batch.unbind(0))
        return [MicroBatch(tokens, torch.from_numpy(self.samples.cu_seqlens(self.stage, rows)))
                for tokens, rows in zip(batch.unbind(0), idx)]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.prefetch:
            self.close()  # a second iteration starts over from the served position
            self._prefetcher = _Prefetcher(self)
            return self._prefetcher
        return self._serial()

    def _serial(self) -> Iterator[list[torch.Tensor]]:
        while self.consumed_samples < self.num_samples:
            batch = self.read_step(self.consumed_samples)
            # counted before yielding: a checkpoint taken after this step's update resumes at the next step
            self.consumed_samples += self.global_batch_size
            yield batch

    def close(self) -> None:
        """Stop and join the prefetch thread (if any); batches it read ahead are dropped, the position is kept."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


class _Prefetcher:
    """The iterator of a prefetching StageLoader: a thread reads steps ahead into a bounded queue, ``__next__``
    serves them in order and advances the loader's position by exactly one step per batch served."""

    _POLL_S = 0.1  # how often a blocked thread or caller checks that the other side is still there

    def __init__(self, loader: StageLoader):
        self.loader = loader
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        # the CUDA device is per thread: pinning from a thread left on device 0 would open a context there for
        # every rank of the node (as torch's DataLoader, set the caller's device in the thread)
        self._cuda_device = torch.cuda.current_device() if loader.pin_memory else None
        self._thread = threading.Thread(target=self._read_ahead, args=(loader.consumed_samples,), daemon=True,
                                        name=f"growlength-prefetch-stage{loader.stage}-rank{loader.rank}")
        self._thread.start()

    def _read_ahead(self, start: int) -> None:
        loader = self.loader
        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            while start < loader.num_samples and not self._stop.is_set():
                self._put((start, loader.read_step(start)))
                start += loader.global_batch_size
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by __next__
            self._put(("error", e))

    def _put(self, item) -> None:
        """Wait for room in the queue, unless the loader is being closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self) -> list[torch.Tensor]:
        loader = self.loader
        if loader.consumed_samples >= loader.num_samples or self._stop.is_set():
            raise StopIteration
        while True:
            try:
                start, batch = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the prefetch thread of stage {loader.stage} ended without serving "
                                       f"sample {loader.consumed_samples}") from None
        if start == "error":
            raise batch
        assert start == loader.consumed_samples, (start, loader.consumed_samples)  # served strictly in order
        loader.consumed_samples += loader.global_batch_size
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # free a put() that is waiting for room, and the pinned buffers
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=self._POLL_S)


def window_batches(stream: WindowStream, seq_len: int, max_windows: int, tokens_per_batch: int, rank: int = 0,
                   world: int = 1, documents: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's share (every world-th window from rank) of ``stream.windows(seq_len, max_windows)``, in
    batches of max(1, tokens_per_batch // seq_len) windows: ``(tokens (B, seq_len + 1) int64, cu_seqlens)``, with
    the windows' document boundaries (CPU int32) when ``documents``, else None. What validation scores."""
    mine = np.ascontiguousarray(stream.windows(seq_len, max_windows)[rank::world])
    bs = max(1, tokens_per_batch // seq_len)
    for i in range(0, len(mine), bs):
        tokens = torch.from_numpy(mine[i:i + bs])
        rows = np.arange(i, i + len(tokens)) * world + rank  # indices into stream.windows
        yield tokens, torch.from_numpy(stream.cu_seqlens(seq_len, rows)) if documents else None
