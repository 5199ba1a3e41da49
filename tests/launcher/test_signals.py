"""Stopping a run the ways users do, on the real deepspeed runner (1 CPU rank): SIGTERM to the runner's PID alone
(which DeepSpeed's runner does not pass on: its launcher child and the rank would train on in the background), and
Ctrl-C to the whole process group. Either way the rank checkpoints at the next step boundary and exits; nothing is
left running."""
import os
import signal
import time

import psutil
import pytest

from launcher import checkpoint as ckpt
from launcher.metrics import read_metrics

from launching import pretrain_args

LONG_PLAN = ["growlength.tokens_per_step=1024", "growlength.stages=[{seq_len: 32, tokens: 4096000}]"]


def start(launch, run_dir, tokenized, sp_model):
    """The deepspeed runner on 1 rank, a plan far longer than the test, running in a session of its own."""
    return launch(pretrain_args(run_dir, tokenized, sp_model, "checkpointing.interval_steps=100000",
                                "logging.eval_interval=0", *LONG_PLAN), runner=True, wait=False)


def wait_for_steps(run_dir, proc, n=3, timeout=600):
    """Until the run logged ``n`` steps (``timeout`` only bounds a run that never trains)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if sum(1 for r in read_metrics(run_dir) if "kind" not in r) >= n:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    pytest.fail("the run did not start training")


def rank_processes(runner_pid):
    return [p for p in psutil.Process(runner_pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())
            and "deepspeed.launcher.launch" not in " ".join(p.cmdline())]


def assert_stopped_with_a_checkpoint(run_dir, procs):
    gone, alive = psutil.wait_procs(procs, timeout=600)  # a bound on a hang, not a speed
    for p in alive:
        p.kill()
    assert not alive, "a process of the run was left running"
    path = ckpt.resolve_resume("auto", run_dir)
    assert path is not None, (run_dir / "train.log").read_text()[-3000:]
    last = max(r["step"] for r in read_metrics(run_dir) if "kind" not in r)
    assert ckpt.read_state(path).step == last >= 3  # saved at the step boundary after the signal
    return (run_dir / "train.log").read_text()


def test_sigterm_to_the_runner_alone_checkpoints_and_stops_every_rank(launch, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = start(launch, run_dir, tokenized, sp_model)
    wait_for_steps(run_dir, proc)
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    assert rank_processes(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)  # the runner alone, as `kill PID` does
    log = assert_stopped_with_a_checkpoint(run_dir, tree)
    assert "the deepspeed runner (pid %d) is gone" % proc.pid in log


def test_ctrl_c_checkpoints_at_the_next_step(launch, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = start(launch, run_dir, tokenized, sp_model)
    wait_for_steps(run_dir, proc)
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job
    log = assert_stopped_with_a_checkpoint(run_dir, tree)
    assert "interrupted: checkpointing at the next step boundary" in log
    assert "KeyboardInterrupt" not in log
