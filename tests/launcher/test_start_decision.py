"""Start-up on 2 real gloo ranks (in process, no launcher): rank 0 alone locks the run directory and chooses the
checkpoint, every rank takes its answer, and a refusal on rank 0 reaches every rank (none is left waiting)."""
from pathlib import Path

import pytest

from launcher import checkpoint as ckpt
from launcher import rundir

from test_checkpoint import _save_like_the_launcher


def decide(rank, world, run_dir, resume):
    from launcher import startup
    from launcher.config import load_config
    cfg = load_config(None, [f"run_dir={run_dir}", f"checkpointing.resume={resume}"])
    try:
        lock, decision = startup.start_decision(cfg, Path(run_dir), rank, world)
    except startup.StartupError as e:
        return "refused: " + str(e)
    if lock is not None:
        lock.release()
    return decision["path"], decision["warnings"]


def test_every_rank_takes_rank_0s_checkpoint(tmp_path, run_distributed):
    root = ckpt.checkpoint_root(tmp_path)
    _save_like_the_launcher(root, 4, world=2)
    newest = _save_like_the_launcher(root, 8, world=2)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    results = run_distributed(decide, 2, str(tmp_path), "auto")
    assert results[0] == results[1]
    path, warnings = results[0]
    assert path == str(root / ckpt.tag_for(4)) and "skipping checkpoint step_00000008" in warnings[0]


def test_a_refusal_on_rank_0_reaches_every_rank(tmp_path, run_distributed):
    lock = rundir.RunLock(tmp_path)  # another job holds the run directory
    try:
        results = run_distributed(decide, 2, str(tmp_path), "auto")
    finally:
        lock.release()
    assert results[0] == results[1]
    assert results[0].startswith("refused: RunDirError: run_dir") and "is in use by a running job" in results[0]
    with pytest.raises(AssertionError):  # sanity: the helper reports a failing rank
        run_distributed(_fail_on_rank_1, 2)


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise RuntimeError("boom")
    return rank
