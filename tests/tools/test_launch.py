"""evidence.launch: the ranks a tool or benchmark starts through the real deepspeed runner get the parent's
CUDA_VISIBLE_DEVICES (the runner drops the variable when given --num_gpus, and would number the GPUs from 0)."""
import os
import re
import subprocess
import sys

import pytest

from evidence.launch import ROOT, launch_command, runner_devices
from evidence.runs import EvidenceError

# each rank writes what it was given to its own file (their stdout lines would interleave)
SHOW_ENV = ("import os, sys; open(os.path.join(sys.argv[-1], os.environ['LOCAL_RANK']), 'w')"
            ".write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n")


def _ranks_env(tmp_path, visible: str | None, ranks: int) -> dict[str, str]:
    """Start the real deepspeed runner on a script that reports each rank's CUDA_VISIBLE_DEVICES by LOCAL_RANK."""
    script = tmp_path / "show_env.py"
    script.write_text(SHOW_ENV)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["LOCAL_SIZE"] = "8"  # the runner's CPU accelerator then counts 8 devices, as a node with 8 GPUs would
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    cmd, env = launch_command(ranks, runner=True, env=env, script=str(script))
    out = tmp_path / "ranks"
    out.mkdir()
    proc = subprocess.run(cmd + [str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {f.name: f.read_text() for f in out.iterdir()}


def test_the_ranks_see_the_parents_gpus(spawns, tmp_path):
    assert _ranks_env(tmp_path, "3,5,6", 2) == {"0": "3,5", "1": "3,5"}


def test_without_cuda_visible_devices_the_ranks_take_the_first_gpus(spawns, tmp_path):
    assert _ranks_env(tmp_path, None, 2) == {"0": "0,1", "1": "0,1"}


def test_runner_device_arguments():
    assert runner_devices(2, {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == ["--include", "localhost:4,5"]
    assert runner_devices(2, {}) == ["--num_gpus", "2"]
    assert runner_devices(1, {"CUDA_VISIBLE_DEVICES": ""}) == ["--num_gpus", "1"]  # GPUs hidden: a CPU run


@pytest.mark.parametrize("visible, ranks, message", [
    ("2,3", 4, "4 ranks but CUDA_VISIBLE_DEVICES=2,3 shows 2 GPU(s)"),
    ("GPU-8a1b,GPU-99ff", 2, "CUDA_VISIBLE_DEVICES=GPU-8a1b,GPU-99ff: the deepspeed runner selects GPUs by index"),
])
def test_devices_the_runner_cannot_select_are_refused(visible, ranks, message):
    with pytest.raises(EvidenceError, match=re.escape(message)):
        runner_devices(ranks, {"CUDA_VISIBLE_DEVICES": visible})


def test_one_rank_runs_without_the_runner():
    cmd, env = launch_command(1, env={"CUDA_VISIBLE_DEVICES": "7"})
    assert cmd[0] == sys.executable and env["CUDA_VISIBLE_DEVICES"] == "7" and env["MASTER_PORT"].isdigit()
