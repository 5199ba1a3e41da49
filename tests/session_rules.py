"""The session rules tests/conftest.py applies, in a module of their own so that tests can import them: which runs
see the GPUs, and which started processes make a test slow (docs/testing.md). No torch import here: conftest.py
hides the GPUs before anything imports it."""
from __future__ import annotations

import multiprocessing.process
import os
import sys
from pathlib import Path

GPU_TESTS = Path(__file__).resolve().parent / "gpu"


def only_gpu_tests(args: list[str]) -> bool:
    """Whether the command line names test paths and all of them are in tests/gpu."""
    paths = [Path(a.split("::")[0]).resolve() for a in args if not a.startswith("-")]
    paths = [p for p in paths if p.exists()]
    return bool(paths) and all(p == GPU_TESTS or GPU_TESTS in p.parents for p in paths)


# commands that start a Python interpreter, a launcher or a job; and inductor's C++ builds of a compiled model (other
# builds that libraries run for themselves, such as DeepSpeed's cached ops through ninja, are not counted)
SPAWNING = ("python", "deepspeed", "torchrun", "sbatch", "srun", "salloc", "mpirun", "mpiexec", "pdsh", "ssh", "bash",
            "make")
COMPILERS = ("g++", "c++", "gcc", "cc", "clang", "clang++")


class SpawnWatch:
    """The processes started while a test that is not marked slow sets up or runs."""

    def __init__(self):
        self.item = None
        self.started: list[str] = []

    def note(self, what: str) -> None:
        if self.item is not None and self.item.get_closest_marker("slow") is None:
            self.started.append(what)

    def audit(self, event: str, args: tuple) -> None:
        if event != "subprocess.Popen" or self.item is None:
            return
        executable, argv = args[0], args[1]
        if not executable:
            executable = argv if isinstance(argv, (str, bytes)) else argv[0]
        name = os.path.basename(os.fsdecode(executable)).split()[0] if executable else ""
        command = os.fsdecode(argv) if isinstance(argv, (str, bytes)) else " ".join(map(os.fsdecode, argv))
        if name.startswith(SPAWNING) or (name in COMPILERS and "torchinductor" in command):
            self.note(command[:200])

    def install(self) -> None:
        """Watch this process: an audit hook on subprocess.Popen, and multiprocessing's Process.start."""
        sys.addaudithook(self.audit)
        start = multiprocessing.process.BaseProcess.start
        watch = self

        def watched_start(process):
            watch.note(f"multiprocessing process {process.name}")
            return start(process)

        multiprocessing.process.BaseProcess.start = watched_start
