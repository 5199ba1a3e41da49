"""Checkpoint bookkeeping: completeness, resume resolution, compatibility, retention, metrics truncation."""
import json

import pytest
import torch

from launcher import checkpoint as ckpt
from launcher.metrics import read_metrics, truncate_after


def make(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.write_state(d, {"step": step})
    return d


def test_auto_resume_skips_incomplete(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    make(root, 10)
    good = make(root, 20)
    make(root, 30, complete=False)  # killed while saving
    assert ckpt.resolve_resume("auto", tmp_path) == good
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "fresh") is None
    assert ckpt.resolve_resume(str(tmp_path), "unused") == good
    assert ckpt.resolve_resume(str(root), "unused") == good
    assert ckpt.resolve_resume(str(root / "step_00000010"), "unused") == root / "step_00000010"


def test_resume_of_a_non_checkpoint_is_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint .* give a RUN_DIR"):
        ckpt.resolve_resume(str(tmp_path / "nothing"), tmp_path)
    bad = make(ckpt.checkpoint_root(tmp_path), 30, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="this checkpoint is incomplete"):
        ckpt.resolve_resume(str(bad), tmp_path)


def test_prepare_dir_clears_only_incomplete(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    half = make(root, 5, complete=False)
    ckpt.prepare_dir(root, half.name, rank=0)
    assert not half.exists()
    full = make(root, 6)
    ckpt.prepare_dir(root, full.name, rank=0)
    assert (full / ckpt.STATE_FILE).is_file()


def test_prune_keeps_newest(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for s in (1, 2, 3, 4):
        make(root, s)
    ckpt.prune(root, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


STATE = {"world_size": 2, "plan_fingerprint": "a", "plan": [{"seq_len": 64, "steps": 3}], "tokens_per_step": 1024,
         "data_fingerprint": "d1", "data_prefix": "/data/a", "seed": 1}


def test_compatibility_names_every_difference(tmp_path):
    assert ckpt.check_compatible(STATE, dict(STATE), tmp_path, force=False) == []
    other = dict(STATE, world_size=4, plan_fingerprint="b", plan=[{"seq_len": 64, "steps": 5}],
                 data_fingerprint="d2", data_prefix="/data/b", seed=2)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible(STATE, other, tmp_path, force=False)
    msg = str(e.value)
    assert "world size: checkpoint 2 ranks, this run 4" in msg
    assert "stage plan: stages (seq_len, steps) [(64, 3)] -> [(64, 5)]" in msg
    assert "data: checkpoint was trained on /data/a" in msg
    assert "seed: 1 -> 2" in msg
    assert "--resume-force" in msg
    assert len(ckpt.check_compatible(STATE, other, tmp_path, force=True)) == 4


def test_rng_round_trip(tmp_path):
    ckpt.save_rng(tmp_path, rank=1)
    a = torch.rand(3)
    ckpt.load_rng(tmp_path, rank=1)
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(ckpt.CheckpointError, match="no RNG state for rank 0"):
        ckpt.load_rng(tmp_path, rank=0)


def test_metrics_truncated_to_resumed_step(tmp_path):
    lines = [{"step": s, "loss": 1.0} for s in range(1, 8)] + [{"kind": "eval", "step": 4},
                                                                 {"kind": "stage", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert truncate_after(tmp_path, 4) == 4
    assert [(r["step"], r.get("kind")) for r in read_metrics(tmp_path)] == [(1, None), (2, None), (3, None), (4, None),
                                                                           (4, "eval")]
    assert truncate_after(tmp_path, 4) == 0
