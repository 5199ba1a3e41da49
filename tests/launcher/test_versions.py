"""launcher/versions.py: a torch or DeepSpeed outside the declared ranges stops the launcher with one line."""
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import versions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("installed, bad", [
    ({"torch": "2.13.0+cpu", "deepspeed": "0.19.8"}, []),
    ({"torch": "2.5.0", "deepspeed": "0.19.9"}, []),
    ({"torch": "2.4.1+cu121", "deepspeed": "0.19.8"}, ["torch 2.4.1+cu121"]),
    ({"torch": "2.13.0", "deepspeed": "0.19.2"}, ["deepspeed 0.19.2"]),   # compile + overlap_comm gradients
    ({"torch": "2.13.0", "deepspeed": "0.19.7"}, ["deepspeed 0.19.7"]),   # single-GPU NCCL init
    ({"torch": "2.13.0", "deepspeed": "0.20.0"}, ["deepspeed 0.20.0"]),
    ({"torch": "2.13.0", "deepspeed": None}, ["deepspeed not installed"]),
])
def test_versions_outside_the_ranges_are_named(installed, bad):
    assert versions.problems(installed) == bad


def test_the_message_is_one_line_with_the_fix():
    text = versions.message(["deepspeed 0.19.2"])
    assert text == ("growlength needs torch>=2.5 and deepspeed>=0.19.8,<0.20; found deepspeed 0.19.2: "
                    "pip install 'deepspeed>=0.19.8,<0.20' (torch: the build for your CUDA)")


def test_the_launcher_stops_at_start_up_with_one_line(spawns, tmp_path):
    """A DeepSpeed 0.19.2 dist-info ahead on the path: launcher/pretrain.py exits 2 with the line, no traceback."""
    fake = tmp_path / "deepspeed-0.19.2.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.2\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "launcher/pretrain.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == versions.message(["deepspeed 0.19.2"])


def test_setup_py_declares_the_same_ranges():
    text = (ROOT / "setup.py").read_text()
    for name, spec in versions.REQUIRED.items():
        assert f'"{name}{spec}"' in text, name
