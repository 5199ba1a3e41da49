"""The launcher's loader thread: a run that stops mid-stage (its time budget) leaves no prefetch thread behind, and
each step record's data_wait_s is the time the step waited for its batches (on a step clock: exact)."""
import threading

from launcher.metrics import read_metrics

from stepclock import StepClock


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("growlength-prefetch")]


def test_no_prefetch_thread_left_after_a_run_stopped_mid_stage(run, monkeypatch):
    clock = StepClock({32: 1.0}, data_seconds=0.25)  # each step: 0.25 s waiting for data, 1 s of training
    clock.attach(monkeypatch.setattr)
    code, out = run("growlength.stages=[{seq_len: 32, tokens: 20480}]", "growlength.max_time_s=3.5",
                    "data.valid_fraction=0", clock=clock)
    assert code == 0, out
    steps = [r for r in read_metrics(run.run_dir) if "kind" not in r]
    # 20 steps planned; the budget is used up by step 3 (3.75 s): stopped there, with 17 steps left to read
    assert [r["step"] for r in steps] == [1, 2, 3] and "growlength.max_time_s=3.5 s reached at step 3" in out
    assert [r["data_wait_s"] for r in steps] == [0.25] * 3
    assert [r["elapsed_s"] for r in steps] == [1.25, 2.5, 3.75]
    assert [r["tokens_per_s"] for r in steps] == [1024 / 1.25] * 3  # the step's own seconds, its wait included
    assert prefetch_threads() == []
