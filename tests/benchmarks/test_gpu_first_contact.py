"""benchmarks/gpu_first_contact.sh, the one command a GPU machine runs, on the CPU: it stops with exit 1 when CUDA
is unusable (after printing the stack), and with REQUIRE_CUDA=0 and a dry-run acceptance of one check it runs every
step and leaves the environment, the acceptance JSON and the work directory's small files in $OUT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_first_contact.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the script")


def run(tmp_path, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable, **env)
    full.pop("GROWLENGTH_FAULT", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=900)


def test_without_cuda_it_prints_the_stack_and_stops(spawns, tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert f"torch {torch.__version__}" in log and "CUDA is not usable:" in log and "stopping" in log
    assert "acceptance run" not in log and json.loads((tmp_path / "out" / "env.json").read_text())["torch"]


def test_every_step_runs_and_the_results_land_in_out(spawns, tmp_path):
    proc = run(tmp_path, REQUIRE_CUDA="0", ACCEPTANCE_ARGS=f"--dry-run --checks parity --builtin-dir {tmp_path}/b")
    out = tmp_path / "out"
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "kernel tests: exit" in log and (out / "kernel-tests.xml").is_file()
    report = json.loads((out / "acceptance.json").read_text())
    assert [c["name"] for c in report["checks"]] == ["parity"] and "acceptance: exit 0" in log
    assert report["table"] in log
