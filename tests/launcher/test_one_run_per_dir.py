"""A run directory belongs to one run (in process, 1 rank, the real engine): a start that would write a second run
into it is refused with the fix and leaves every file of the old run byte-identical; ``checkpointing.start_over``
moves the old run aside, whole, and starts there."""
from pathlib import Path

from launcher import checkpoint as ckpt
from launcher import rundir
from launcher.metrics import read_metrics

from runner import assert_refused


def snapshot(d: Path) -> dict:
    """Every file of a run directory and its bytes, but the lock file (the start that is refused holds it)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_FILE}


def test_resuming_another_runs_checkpoint_into_a_run_dir_with_its_own_run_is_refused(run, tmp_path):
    other = tmp_path / "other"
    assert run(run_dir=other)[0] == 0
    assert run()[0] == 0
    before = snapshot(run.run_dir)
    assert_refused(run(f"checkpointing.resume={ckpt.checkpoint_root(other)}"),
                   f"continues another run, but run_dir {run.run_dir} holds a run of its own")
    assert_refused(run(f"checkpointing.resume={other}"), "pass --start-over (checkpointing.start_over=true)")
    assert snapshot(run.run_dir) == before
    assert run(f"checkpointing.resume={ckpt.checkpoint_root(run.run_dir)}")[0] == 0  # its own: a resume


def test_a_run_whose_every_checkpoint_is_damaged_is_not_restarted_in_place(run):
    assert run("checkpointing.interval_steps=1")[0] == 0
    for path in ckpt.complete_checkpoints(ckpt.checkpoint_root(run.run_dir)):
        model_file = path / "mp_rank_00_model_states.pt"
        model_file.write_bytes(model_file.read_bytes()[:100])  # what a full disk leaves
    before = snapshot(run.run_dir)
    assert_refused(run("checkpointing.interval_steps=1"),
                   f"every checkpoint of run_dir {run.run_dir} is damaged (2; the newest: ")
    assert snapshot(run.run_dir) == before
    code, out = run("checkpointing.interval_steps=1", "checkpointing.start_over=true")
    assert code == 0, out
    [aside] = run.run_dir.parent.glob(f"{run.run_dir.name}.old-*")
    assert "the previous run of" in out and f"was moved aside to {aside}" in out
    assert snapshot(aside) == before
    assert [r["step"] for r in read_metrics(run.run_dir) if "kind" not in r] == [1, 2]  # one run, not two
