"""data_pipeline.atomic: a crash leaves the old file byte-identical and no temporary, one temp-name convention,
stale temporaries of dead writers removed, directories replaced whole, and "can I write here?" in one line."""
import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from data_pipeline import atomic
from data_pipeline.atomic import atomic_dir, atomic_path, check_dir_writable, tmp_name, write_bytes, write_text

OLD = b"old contents\x00\xff\n"


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


class Killed(Exception):
    pass


@pytest.mark.parametrize("as_path", [True, False])
def test_a_crash_between_write_and_rename_leaves_the_old_file_and_no_temp(tmp_path, as_path):
    target = tmp_path / "report.json"
    target.write_bytes(OLD)
    with pytest.raises(Killed):
        with atomic_path(target if as_path else str(target)) as tmp:
            assert str(tmp) == f"{target}.tmp-{os.getpid()}" and isinstance(tmp, Path) == as_path
            with open(tmp, "wb") as f:
                f.write(b"half a new rep")
            assert os.path.exists(tmp)
            raise Killed("the writer dies before the rename")
    assert target.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_rename_removes_the_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_bytes(OLD)

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        write_text(target, "new")
    assert target.read_bytes() == OLD and os.listdir(tmp_path) == ["state.json"]


def test_a_complete_write_replaces_the_file_and_creates_its_directory(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.jsonl"
    write_bytes(target, b"1\n")
    write_text(target, "2\n")
    assert target.read_text() == "2\n" and os.listdir(target.parent) == ["metrics.jsonl"]


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "x.idx"
    dead = dead_pid()
    stale_file, stale_dir = Path(f"{target}.tmp-{dead}"), Path(f"{target}.tmp-{dead}-old")
    live = Path(f"{target}.tmp-{os.getppid()}")  # pytest's parent: alive and writing
    other = tmp_path / f"y.idx.tmp-{dead}"  # another file's temporary: not ours to clean
    stale_file.write_bytes(b"torn")
    stale_dir.mkdir()
    (stale_dir / "f").write_bytes(b"torn")
    live.write_bytes(b"in progress")
    other.write_bytes(b"torn")
    write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.idx", live.name, other.name])
    assert atomic.remove_stale_temps_in(tmp_path) == [str(other)]  # a whole cache directory's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.idx", live.name])


def test_atomic_dir_replaces_a_directory_whole(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "stale.txt").write_text("old")
    with pytest.raises(Killed):
        with atomic_dir(out) as tmp:
            assert tmp == Path(tmp_name(out)) and tmp.is_dir()
            (tmp / "config.json").write_text("half")
            raise Killed()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "config.json").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and os.listdir(out) == ["config.json"]
    assert (out / "config.json").read_text() == "new"


def test_atomic_dir_without_replace_keeps_the_first_complete_copy(tmp_path):
    out = tmp_path / "cache"
    with atomic_dir(out, replace=False) as tmp:
        (tmp / "meta.json").write_text("first")
        other = tmp_path / "other"  # another builder finishes first, while we write
        other.mkdir()
        (other / "meta.json").write_text("other")
        os.rename(other, out)
    assert (out / "meta.json").read_text() == "other" and os.listdir(tmp_path) == ["cache"]


@contextlib.contextmanager
def read_only_dir():
    """A directory this process cannot create files in: mode 0555 and, where we are root (who writes through
    permission bits), the check run with the effective uid of nobody."""
    base = Path(tempfile.mkdtemp())
    os.chmod(base, 0o755)
    ro = base / "ro"
    ro.mkdir(mode=0o555)
    os.chmod(ro, 0o555)
    try:
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                yield ro
            finally:
                os.seteuid(0)
        else:
            yield ro
    finally:
        os.chmod(ro, 0o755)
        atomic.remove_quietly(base)


class BadFlag(ValueError):
    pass


def test_check_dir_writable_names_the_path_in_one_line(tmp_path):
    with read_only_dir() as ro:
        for directory in (ro, ro / "new" / "deeper"):
            with pytest.raises(BadFlag) as e:
                check_dir_writable(directory, "--out", f"{directory}/report.json", BadFlag)
            assert str(e.value) == (f"--out {directory}/report.json: cannot write in {ro} (Permission denied); choose "
                                    f"a directory you can write to")
        assert os.listdir(ro) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadFlag, match=rf"^run_dir {tmp_path}/afile/run: {tmp_path}/afile is a file, not a "
                                      rf"directory; choose another run_dir$"):
        check_dir_writable(tmp_path / "afile" / "run", "run_dir", error=BadFlag)
    assert check_dir_writable(tmp_path / "new" / "deeper", "--out") == tmp_path
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # checking creates nothing
