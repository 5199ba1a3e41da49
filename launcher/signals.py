"""Preemption: SIGTERM/SIGUSR1 (and a first Ctrl-C) become a flag that the loop reads at each step boundary, and a
deepspeed runner that went away counts as one. The loop checkpoints and exits with EXIT_PREEMPTED for a requeue
(DESIGN.md decision 7)."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("growlength")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1, requeue me


class Preemption:
    """SIGTERM/SIGUSR1 (and a first Ctrl-C) set a flag; the loop checkpoints at the next step boundary and exits for
    a requeue. Under the deepspeed runner, the runner's death sets it too: stopping the runner's PID alone leaves
    its ``deepspeed.launcher.launch`` child and the ranks running, so each rank watches its launcher's parent."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handler)
                          for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        self._runner = _deepspeed_runner()

    def restore(self) -> None:
        """Put back the handlers that were there before (main() may run inside another program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT:
            log.warning("interrupted: checkpointing at the next step boundary (Ctrl-C again to stop at once)")
        self.signal = signum

    def poll(self) -> None:
        """Called once per step: notice a deepspeed runner that is gone (one /proc read)."""
        if self._runner is not None and self.signal is None and _parent_of(self._runner[0]) != self._runner[1]:
            log.warning("the deepspeed runner (pid %d) is gone: checkpointing at this step boundary and exiting",
                        self._runner[1])
            self.signal = signal.SIGTERM
            self._runner = None


def _parent_of(pid: int) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _deepspeed_runner() -> tuple[int, int] | None:
    """``(pid of deepspeed.launcher.launch, pid of its parent)`` when that module started this process (Linux)."""
    launch = os.getppid()
    try:
        if b"deepspeed.launcher.launch" not in Path(f"/proc/{launch}/cmdline").read_bytes():
            return None
    except OSError:
        return None
    runner = _parent_of(launch)
    return (launch, runner) if runner else None
