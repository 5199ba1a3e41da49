"""The Makefile's install stamp and `make test-gpu`, run for real against a stand-in virtualenv whose python logs
every pip command (and runs everything else with this interpreter): a changed TORCH_SPEC reinstalls torch, an
unchanged one installs nothing, and test-gpu fails before pytest when CUDA cannot be used."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="needs GNU make")


@pytest.fixture
def venv(tmp_path, spawns):
    """A fake VENV: bin/python logs `-m pip ...` to pip.log and exits 0, and execs the real python otherwise."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    py = bin_dir / "python"
    py.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {tmp_path}/pip.log; exit 0; fi\n'
                  f'exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return tmp_path


def make(venv, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["make", "-C", str(ROOT), f"VENV={venv / 'venv'}", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def pip_calls(venv) -> list[str]:
    log = venv / "pip.log"
    calls = log.read_text().splitlines() if log.is_file() else []
    log.unlink(missing_ok=True)
    return calls


def test_a_changed_torch_spec_reinstalls_torch_and_an_unchanged_one_installs_nothing(venv):
    assert make(venv, "install", "TORCH_SPEC=torch==2.13.0").returncode == 0
    first = pip_calls(venv)
    assert "-m pip install -q torch==2.13.0" in first and "-m pip uninstall -q -y torch" in first
    assert make(venv, "install", "TORCH_SPEC=torch==2.13.0").returncode == 0
    assert pip_calls(venv) == []
    proc = make(venv, "install", "TORCH_SPEC=torch==2.11.0", "TORCH_INDEX=https://download.pytorch.org/whl/cu130")
    assert proc.returncode == 0, proc.stderr
    assert pip_calls(venv) == ["-m pip install -q --upgrade pip", "-m pip uninstall -q -y torch",
                               "-m pip install -q --index-url https://download.pytorch.org/whl/cu130 torch==2.11.0",
                               "-m pip install -q -e .[dev]"]
    assert (venv / "venv" / ".growlength-torch").read_text().split() == [
        "torch==2.11.0", "https://download.pytorch.org/whl/cu130"]


def test_test_gpu_fails_without_cuda_and_prints_the_stack_first(venv):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    proc = make(venv, "test-gpu")
    assert proc.returncode != 0
    out = proc.stdout
    assert f"torch {torch.__version__} | torch.version.cuda {torch.version.cuda}" in out
    assert "NVIDIA driver" in out and "CUDA is not usable:" in out
    assert "pytest" not in out.split("cuda_env.py", 1)[1]  # stopped before the (skipping) GPU tests
