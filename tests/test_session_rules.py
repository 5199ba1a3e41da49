"""tests/session_rules.py, the two rules tests/conftest.py applies: GPUs hidden unless only tests/gpu is run, and the watch that fails a test
starting a process without the slow marker."""
import os

import pytest

from session_rules import GPU_TESTS, SpawnWatch, only_gpu_tests


def test_gpus_are_hidden_unless_every_path_given_is_in_tests_gpu():
    gpu_file = str(GPU_TESTS / "test_cuda_kernels.py")
    assert only_gpu_tests([str(GPU_TESTS)]) and only_gpu_tests(["-q", f"{gpu_file}::test_x", "-k", "flash"])
    assert not only_gpu_tests([])  # pytest's testpaths: the whole suite
    assert not only_gpu_tests([str(GPU_TESTS), str(GPU_TESTS.parent / "launcher")])
    assert not only_gpu_tests([str(GPU_TESTS.parent)])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # this session runs more than tests/gpu


class Item:
    def __init__(self, slow: bool):
        self.slow = slow

    def get_closest_marker(self, name):
        return object() if name == "slow" and self.slow else None


def started(argv, slow=False, executable=None) -> list[str]:
    watch = SpawnWatch()
    watch.item = Item(slow)
    watch.audit("subprocess.Popen", (executable, argv, None, None))
    watch.audit("open", ("python", "r", 0))  # other audit events are not processes
    return watch.started


@pytest.mark.parametrize("argv", [["/venv/bin/python", "-m", "data_pipeline.preprocess"], ["python3.11", "-c", "x"],
                                  ["/venv/bin/deepspeed", "--num_gpus", "2", "launcher/pretrain.py"],
                                  ["sbatch", "job.sh"], ["mpirun", "-np", "2", "python"], ["bash", "-c", "srun x"],
                                  ["g++", "/tmp/torchinductor_root/ab/c.cpp", "-o", "c.so"]])
def test_starting_an_interpreter_a_launcher_a_job_or_an_inductor_build_is_noticed(argv):
    assert started(argv) == [" ".join(argv)]
    assert started(argv, slow=True) == []  # allowed in a slow test


@pytest.mark.parametrize("argv", [["ninja", "-v"], ["c++", "--version"], ["/sbin/ldconfig", "-p"], ["true"]])
def test_build_tools_and_trivial_commands_are_not_counted(argv):
    assert started(argv) == []


def test_the_executable_argument_names_the_program():
    assert started(["x", "-c", "pass"], executable="/venv/bin/python") == ["x -c pass"]
