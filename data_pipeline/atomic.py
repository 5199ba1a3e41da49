"""Files other processes read are complete or absent: the one home of atomic writes for the whole project.

Contract: a file (or directory) PATH is written under `PATH.tmp-PID` (one convention everywhere), flushed to disk
(fsync) and renamed over PATH; on an exception the temporary is removed and an existing PATH is left byte-identical.
Temporaries of a dead PID (a killed writer) are removed before the next write of the same PATH.
`check_dir_writable` answers "can I write here?" before any work, in one line naming the path.
Standard library only: data_pipeline, launcher, evidence and benchmarks all import it.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
_TMP = re.compile(r"\.tmp-(\d+)(?:-.*)?$")  # PATH.tmp-PID, or PATH.tmp-PID-WHAT (e.g. a directory moved aside)


def tmp_name(path: str | os.PathLike) -> str:
    """The temporary name this process writes `path` under."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (one we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove `PATH.tmp-PID*` files/directories whose PID names a dead process; returns what was removed.

    A live process's temporaries are never touched (it may still be writing them)."""
    return _remove_stale(glob.escape(os.fspath(path)) + ".tmp-*")


def remove_stale_temps_in(directory: str | os.PathLike) -> list[str]:
    """`remove_stale_temps` for every file of `directory` (e.g. a cache of many keys)."""
    return _remove_stale(os.path.join(glob.escape(os.fspath(directory)), "*.tmp-*"))


def _remove_stale(pattern: str) -> list[str]:
    removed = []
    for tmp in sorted(glob.glob(pattern)):
        m = _TMP.search(os.path.basename(tmp))
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        except FileNotFoundError:  # another process cleaned it first
            continue
        except OSError as e:
            log.warning("%s: left by a stopped run (pid %s) but cannot be removed (%s)", tmp, m.group(1),
                        e.strerror or e)
            continue
        removed.append(tmp)
        log.warning("removed %s, left by a stopped run (pid %s)", tmp, m.group(1))
    return removed


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree if it is there."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file below a directory, and the directories themselves."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_file(dirpath)


def _fsync_parent(path: str) -> None:
    """Make a rename in `path`'s directory durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fsync_file(os.path.dirname(os.path.abspath(path)))
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields the temporary name to write `path` under (a `Path` if `path` is one; its directory is created); on a
    clean exit it is fsynced and renamed over `path`, on an exception removed, leaving an existing `path` unchanged."""
    final = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    remove_stale_temps(final)
    tmp = tmp_name(final)
    try:
        yield Path(tmp) if isinstance(path, Path) else tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise
    _fsync_parent(final)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True):
    """Yields an empty temporary directory to fill in place of directory `path`; on a clean exit its files are
    fsynced and it is renamed to `path`, on an exception removed.

    An existing `path` is, with `replace`, moved aside (`PATH.tmp-PID-old`) and deleted only once the new one is in
    place, so an interruption leaves one of them complete; without `replace` it is kept and ours is dropped (another
    writer finished the same content first)."""
    final = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    remove_stale_temps(final)
    tmp = tmp_name(final)
    os.mkdir(tmp)
    try:
        yield Path(tmp) if isinstance(path, Path) else tmp
        fsync_tree(tmp)
        _rename_dir(tmp, final, replace)
    except BaseException:
        remove_quietly(tmp)
        raise
    _fsync_parent(final)


def _rename_dir(tmp: str, final: str, replace: bool) -> None:
    if not os.path.exists(final):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not os.path.isdir(final):
                raise
    if not replace:  # lost a race: the other writer's directory stays
        remove_quietly(tmp)
        return
    old = tmp + "-old"
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove_quietly(old)


def check_dir_writable(directory: str | os.PathLike, flag: str, given: str | os.PathLike | None = None,
                       error: type[Exception] = OSError) -> Path:
    """Refuse, before any work and creating nothing, a `directory` this process cannot create files in: its nearest
    existing ancestor must be a directory in which a probe file can be created (the rest is created later).
    Raises `error` with one line naming `flag`, the value `given` (default: `directory`) and the place that fails;
    returns that ancestor."""
    directory = Path(directory)
    given = directory if given is None else given
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise error(f"{flag} {given}: {existing} is a file, not a directory; choose another {flag}")
    probe = existing / tmp_name(".write-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as e:
        raise error(f"{flag} {given}: cannot write in {existing} ({e.strerror or e}); choose a directory you can "
                    f"write to") from None
    return existing
