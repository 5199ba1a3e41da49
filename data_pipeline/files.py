"""How the data tools write files: outputs are checked before any work, written through `data_pipeline.atomic`
(`NAME.tmp-PID`, renamed when complete; a dead PID's temporaries removed at the next start), an OS error
(read-only place, full disk, a file where a directory should be) becomes one `DatasetError` line naming the file,
and SIGTERM stops a CLI like Ctrl-C does, so its temporary files are removed too.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager

from data_pipeline.atomic import check_dir_writable, fsync_file, remove_quietly
from data_pipeline.errors import DatasetError


def os_error(path: str, e: OSError, action: str = "write") -> DatasetError:
    """One line for an OS error on `path`: what failed, the system's reason, and what to do."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota / `ulimit -f`) or write somewhere else"
    elif e.errno in (errno.EACCES, errno.EPERM) and action == "read":
        fix = "fix its permissions"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "write to a directory you can write to"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        fix = "a part of the path is a file, not a directory; choose another path"
    elif e.errno == errno.EISDIR:
        fix = "it is a directory; choose another path"
    else:
        fix = "check the path and the disk"
    return DatasetError(f"{path}: cannot {action} ({reason}); {fix}")


def _existing_ancestor(path: str) -> str:
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def make_parent_dir(path: str, flag: str = "output") -> None:
    """Create the directory that will hold `path`, or raise one line naming `flag` and what is in the way."""
    probe = _existing_ancestor(path)
    if not os.path.isdir(probe):
        raise DatasetError(f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise os_error(parent, e, "create the directory") from None


def check_output_prefix(prefix: str, suffixes: tuple[str, ...], flag: str = "output prefix") -> None:
    """Refuse, before any work (and creating nothing), a prefix whose outputs PREFIX+suffix cannot be written
    as files: empty, naming a directory (`dir/`), carrying an output suffix (`x.bin` would write `x.bin.bin`),
    an output path that is a directory, a file where a directory of the path should be, or a directory this
    process may not write to."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise DatasetError(f"{flag} {prefix!r}: empty; give a path prefix such as data/corpus")
    if prefix.endswith((os.sep, "/")) or os.path.basename(prefix) in (".", ".."):
        raise DatasetError(f"{flag} {prefix}: names a directory, not a file prefix; give e.g. "
                           f"{os.path.join(prefix, 'corpus')}")
    for suffix in suffixes:
        if prefix.endswith(suffix):
            raise DatasetError(f"{flag} {prefix}: ends with {suffix} (it would write {prefix}{suffix}); give the "
                               f"prefix without the extension: {prefix[:-len(suffix)]}")
    for suffix in suffixes:
        if os.path.isdir(prefix + suffix):
            raise DatasetError(f"{flag} {prefix}: {prefix}{suffix} is a directory; remove it or choose another "
                               f"{flag}")
    check_dir_writable(os.path.dirname(os.path.abspath(prefix)), flag, prefix, DatasetError)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when SIGINT or SIGTERM arrives under `stop_on_signals` (handled like Ctrl-C:
    temporary files are removed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(e, "signum", signal.SIGINT)


_signals = {"renaming": 0, "deferred": None}


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM raise `Stopped` in the main thread, except while outputs are renamed
    into place (`renaming()`), when the signal is held until the renames are done (see `deferred_signal`).
    For a CLI's main only; library code leaves the signal handlers to its caller (e.g. the launcher's)."""
    def handler(signum, frame):
        if _signals["renaming"]:
            _signals["deferred"] = signum
            return
        raise Stopped(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _signals["deferred"] = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def renaming():
    """Renames of complete outputs: a stop signal now would leave a new file beside an old one, so it waits."""
    _signals["renaming"] += 1
    try:
        yield
    finally:
        _signals["renaming"] -= 1


def deferred_signal() -> str | None:
    """The name of a stop signal that arrived while outputs were being renamed (they are complete), if any."""
    signum, _signals["deferred"] = _signals["deferred"], None
    return signal.Signals(signum).name if signum else None


def dataset_interrupted(prefix: str, e: KeyboardInterrupt) -> int:
    """A dataset CLI stopped by a signal: one line (nothing written, an existing dataset unchanged), 128 + signal."""
    print(f"interrupted ({e or 'SIGINT'}): {prefix}.bin/.idx not written (an existing one is unchanged)",
          file=sys.stderr)
    return exit_code(e)


def report_deferred_signal(prefix: str) -> None:
    """After a dataset CLI's renames: say so if a stop signal waited for them (the outputs are complete)."""
    if signame := deferred_signal():
        print(f"{signame} arrived while {prefix}.bin/.idx were renamed into place: they are complete",
              file=sys.stderr)


def replace_all(pairs: list[tuple[str, str]]) -> None:
    """Rename each (tmp, final) into place; on failure remove every temporary file and raise one line."""
    try:
        for tmp, _ in pairs:
            fsync_file(tmp)
        with renaming():
            for tmp, final in pairs:
                os.replace(tmp, final)
    except OSError as e:
        for tmp, _ in pairs:
            remove_quietly(tmp)
        raise os_error(final, e, "rename into place") from None
