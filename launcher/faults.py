"""Fault injection for tests: real signals at exact steps, chosen by the GROWLENGTH_FAULT environment variable
(unset in normal runs, where every hook does nothing)."""
from __future__ import annotations

import os
import signal

import torch


class FaultInjection:
    """Test hooks that deliver real signals at exact steps: ``GROWLENGTH_FAULT=kill@7`` SIGKILLs every rank after
    step 7, ``sigusr1@7`` signals rank 0 only (the others must learn of it through the step's collective),
    ``kill-in-save@7`` SIGKILLs every rank inside the save of step 7, after DeepSpeed wrote its files, ``nan@7``
    makes step 7's loss NaN on every rank (through the backward too, as a bad batch or an overflow would)."""

    def __init__(self, rank: int):
        spec = os.environ.get("GROWLENGTH_FAULT", "")
        self.kind, _, step = spec.partition("@")
        self.step = int(step) if step else -1
        self.rank = rank

    def after_step(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sigusr1" and self.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.kind == "nan" and step == self.step else loss

    def in_save(self, step: int) -> None:
        if self.kind == "kill-in-save" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
