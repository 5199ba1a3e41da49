"""Distributed loader over one GrowLength stage: per optimizer step, this rank's `grad_accum` micro-batches.

Global batch = micro_batch_size * grad_accum * world_size consecutive samples of the stage's shuffled order.
Micro-step m of a step starting at sample s serves the samples s + m * (mbs * W) + [r * mbs, (r + 1) * mbs) to
rank r, so ranks get disjoint slices and the union over ranks and micro-steps is the whole global batch.

The position is `{"stage": k, "consumed_samples": n}` (global samples of stage k consumed, counted at whole
optimizer steps); `StageLoader.from_state_dict` restores it mid-stage or exactly at a stage boundary and yields
exactly the batches an uninterrupted loader would have. Each stage gets a new StageLoader (micro-batch size may
change between stages). torch is used for tensors only.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from data_pipeline.errors import SamplePlanError
from data_pipeline.samples import GrowLengthSamples


class MicroBatch(NamedTuple):
    """A micro-batch with its document boundaries (what StageLoader(documents=True) yields)."""

    tokens: torch.Tensor      # (mbs, seq_len + 1) int64: inputs and shifted labels
    cu_seqlens: torch.Tensor  # (m + 1,) int32 document starts over the mbs * seq_len flattened inputs, CPU


class StageLoader:
    """Iterate optimizer steps of one stage: each item is a list of `grad_accum` LongTensors (mbs, seq_len + 1),
    or of `MicroBatch`es with their document boundaries when `documents` (for document masking)."""

    def __init__(self, samples: GrowLengthSamples, stage: int, micro_batch_size: int, grad_accum: int, rank: int,
                 world_size: int, consumed_samples: int = 0, documents: bool = False):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                            ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise SamplePlanError(f"{name} {value!r}: must be a positive integer")
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
        self.consumed_samples = int(consumed_samples)
        self.documents = bool(documents)

    @classmethod
    def from_state_dict(cls, samples: GrowLengthSamples, state: dict, micro_batch_size: int, grad_accum: int,
                        rank: int, world_size: int, documents: bool = False) -> "StageLoader":
        """Rebuild a loader at a saved position (see `state_dict`)."""
        missing = {"stage", "consumed_samples"} - set(state)
        if missing:
            raise SamplePlanError(f"loader state {state!r}: missing keys {sorted(missing)}")
        return cls(samples, int(state["stage"]), micro_batch_size, grad_accum, rank, world_size,
                   int(state["consumed_samples"]), documents)

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

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while self.consumed_samples < self.num_samples:
            idx = self.step_indices(self.consumed_samples)            # (grad_accum, mbs)
            batch = self.samples.samples(self.stage, idx.reshape(-1))  # (grad_accum * mbs, L+1)
            batch = torch.from_numpy(batch).view(self.grad_accum, self.micro_batch_size, self.seq_len + 1)
            # counted before yielding: a checkpoint taken after this step's update resumes at the next step
            self.consumed_samples += self.global_batch_size
            if not self.documents:
                yield list(batch.unbind(0))
                continue
            yield [MicroBatch(tokens, torch.from_numpy(self.samples.cu_seqlens(self.stage, rows)))
                   for tokens, rows in zip(batch.unbind(0), idx)]
