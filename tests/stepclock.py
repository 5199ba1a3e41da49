"""A clock for the launcher that moves only when an optimizer step is taken, by the seconds the test gives for the
step's sequence length. Every wall-clock decision (``growlength.max_time_s``, the step records' ``elapsed_s`` and
``tokens_per_s``, ``evidence.compare``'s calibration and plans built from it) then comes out at exactly the step
the test computes, however busy the machine is.

In this process: ``clock = StepClock({32: 0.5}); clock.attach(monkeypatch.setattr)``, then
``launcher.pretrain.main(args, clock=clock)``. As a process: ``python tests/stepclock.py ARGS`` runs
``pretrain.main(ARGS)`` on a StepClock of the ``STEP_SECONDS`` environment variable (JSON ``{"32": 0.5, ...}``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEP_SECONDS = "GROWLENGTH_TEST_STEP_SECONDS"
SCRIPT = Path(__file__).resolve()


class StepClock:
    """``clock()``: the seconds of the optimizer steps taken so far; a step at sequence length L costs
    ``seconds[L]``, drawing a step's batches from the training loader ``data_seconds``, and nothing else
    (validation, checkpoints, start-up) takes any time."""

    def __init__(self, seconds: dict[int, float], data_seconds: float = 0.0):
        self.seconds = {int(k): float(v) for k, v in seconds.items()}
        self.data_seconds = data_seconds
        self.now = 0.0
        self.seq_len: int | None = None  # of the last training forward

    def __call__(self) -> float:
        return self.now

    def attach(self, setattr_=setattr) -> None:
        """Make every engine the launcher creates advance this clock at each optimizer step, and its training
        loaders at each step's batches (``setattr_``: ``monkeypatch.setattr`` in a test, to undo it afterwards)."""
        from launcher import data, engine

        create = engine.create_engine

        def create_engine(model, *args, **kwargs):
            model.register_forward_pre_hook(self._saw_batch)
            eng = create(model, *args, **kwargs)
            step = eng.step

            def timed_step(*a, **k):
                out = step(*a, **k)
                self.now += self.seconds[self.seq_len]
                return out

            eng.step = timed_step
            return eng

        setattr_(engine, "create_engine", create_engine)
        make_loader = data.TrainData.loader
        setattr_(data.TrainData, "loader", lambda *a, **k: _ChargedLoader(make_loader(*a, **k), self))

    def _saw_batch(self, module, args) -> None:
        if module.training:  # validation batches run in eval mode and cost nothing
            self.seq_len = args[0].shape[1]  # input_ids: (B, T)


class _ChargedLoader:
    """A stage loader whose steps cost ``clock.data_seconds`` each to draw."""

    def __init__(self, loader, clock: StepClock):
        self._loader, self._clock = loader, clock

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for step in self._loader:
            self._clock.now += self._clock.data_seconds
            yield step


def env(seconds: dict[int, float]) -> dict[str, str]:
    """The environment variable that gives ``python tests/stepclock.py`` these step costs."""
    return {STEP_SECONDS: json.dumps({str(k): v for k, v in seconds.items()})}


if __name__ == "__main__":
    sys.path.insert(0, str(SCRIPT.parents[1]))
    from launcher import pretrain

    clock = StepClock(json.loads(os.environ[STEP_SECONDS]))
    clock.attach()
    sys.exit(pretrain.main(sys.argv[1:], clock=clock))
