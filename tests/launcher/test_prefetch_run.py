"""The launcher's loader thread: a run that stops mid-stage (its time budget) leaves no prefetch thread behind."""
import threading

from launcher.metrics import read_metrics


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("growlength-prefetch")]


def test_no_prefetch_thread_left_after_a_run_stopped_mid_stage(run):
    code, out = run("growlength.stages=[{seq_len: 32, tokens: 20480}]", "growlength.max_time_s=0.001",
                    "data.valid_fraction=0")
    assert code == 0, out
    steps = [r for r in read_metrics(run.run_dir) if "kind" not in r]
    assert len(steps) < 20 and "growlength.max_time_s=0.001 s reached" in out  # stopped with steps left to read
    assert all(r["data_wait_s"] >= 0 for r in steps)
    assert prefetch_threads() == []
