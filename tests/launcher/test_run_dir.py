"""The run directory, in process on 1 rank (real DeepSpeed engine, gloo): one run at a time, never overwritten by a
fresh start, checked for everything the loop will need before training, damaged checkpoints skipped, and a copy of
the tokenizer plus resolved paths so the run stands on its own."""
import json
import os
from pathlib import Path

from launcher import checkpoint as ckpt
from launcher import rundir
from launcher.metrics import read_metrics

from runner import assert_refused


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_second_run_in_a_locked_run_dir_is_refused(run):
    run.run_dir.mkdir()
    lock = rundir.RunLock(run.run_dir)  # what a live run holds
    try:
        assert_refused(run(), f"run_dir {run.run_dir} is in use by a running job (pid {os.getpid()} on")
        assert not (run.run_dir / "checkpoints").exists() and not (run.run_dir / "metrics.jsonl").exists()
    finally:
        lock.release()
    code, out = run()  # the kernel dropped the lock with the descriptor: the run goes ahead
    assert code == 0, out


def test_resume_none_never_overwrites_a_previous_run(run):
    code, out = run("checkpointing.interval_steps=1")
    assert code == 0, out
    before = snapshot(run.run_dir)
    assert_refused(run("checkpointing.resume=none"), "--resume none, but run_dir")
    after = snapshot(run.run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items()
                                                                    if k != "train.log"}


def test_eval_length_beyond_the_validation_split_is_refused_before_training(run):
    assert_refused(run("data.valid_fraction=0.1", "logging.eval_lengths=[200000]"),
                   "logging.eval_lengths 200000:", run.run_dir)
    assert_refused(run("data.valid_fraction=0.1", "growlength.tokens_per_step=16384",
                       "growlength.stages=[{seq_len: 16384, tokens: 16384}]"),
                   "a stage's seq_len 16384:", run.run_dir)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run):
    code, out = run("checkpointing.interval_steps=1", "checkpointing.keep_last=5")
    assert code == 0, out
    root = ckpt.checkpoint_root(run.run_dir)
    newest = root / ckpt.tag_for(2)
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # what a full disk leaves
    losses = {r["step"]: r["loss"] for r in read_metrics(run.run_dir) if "kind" not in r}
    code, out = run("checkpointing.interval_steps=1", "checkpointing.keep_last=5")
    assert code == 0, out
    assert "skipping checkpoint step_00000002:" in out and "mp_rank_00_model_states.pt has 100 bytes" in out
    assert "step_00000001 at step 1" in out
    again = {r["step"]: r["loss"] for r in read_metrics(run.run_dir) if "kind" not in r}
    assert again == losses  # step 2 redone from step 1's checkpoint: the same loss, logged once


def test_run_holds_its_tokenizer_and_resolved_paths(run, sp_model, tokenized, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rel_tok = os.path.relpath(sp_model, tmp_path)
    code, out = run(tokenizer=rel_tok)
    assert code == 0, out
    state = ckpt.read_state(ckpt.resolve_resume("auto", run.run_dir))
    assert state.tokenizer == rel_tok and state.tokenizer_resolved == str(Path(sp_model).resolve())
    assert state.data_prefix_resolved == str(Path(tokenized).resolve())
    copy = run.run_dir / state.tokenizer_in_run
    assert state.tokenizer_in_run == "tokenizer/tokenizer.model" and copy.read_bytes() == Path(sp_model).read_bytes()
    resolved = json.loads((run.run_dir / "ds_config.resolved.json").read_text())
    assert resolved["train_micro_batch_size_per_gpu"] == 32
    assert not list(run.run_dir.glob("*.tmp-*"))
