"""Checkpoint bookkeeping: the state record, completeness, resume resolution, compatibility, retention, metrics
truncation."""
import dataclasses
import json

import pytest
import torch

from launcher import checkpoint as ckpt
from launcher.metrics import read_metrics, truncate_after


def state(**changes) -> ckpt.CheckpointState:
    """A complete state record, as the launcher writes one, with ``changes``."""
    fields = dict(step=0, stage=0, loader={"stage": 0, "consumed_samples": 0}, tokens_seen=0, elapsed_s=0.0,
                  stage_seconds={}, plan=[{"seq_len": 64, "steps": 3}], plan_fingerprint="a", tokens_per_step=1024,
                  world_size=2, seed=1, data_fingerprint="d1", data_prefix="/data/a", data_prefix_resolved="/data/a",
                  tokenizer="tok.model", tokenizer_resolved="/tok.model", tokenizer_in_run=None, model={},
                  config={})
    return ckpt.CheckpointState(**{**fields, **changes})


def make(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.write_state(d, state(step=step))
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


STATE = state()


def test_compatibility_names_every_difference(tmp_path):
    assert ckpt.check_compatible(STATE, state(), tmp_path, force=False) == []
    other = state(world_size=4, plan_fingerprint="b", plan=[{"seq_len": 64, "steps": 5}],
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


def test_compatibility_covers_the_model_and_the_split(tmp_path):
    """A changed architecture (rope_base, rotary_pct, layers, vocab, HF init) or validation split is refused;
    runtime-only switches (attention backend, activation checkpointing) are not differences."""
    model = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "rotary_pct": 0.25,
             "rope_base": 10000.0, "attention": "auto", "activation_checkpointing": False}
    config = {"data": {"valid_fraction": 0.01, "epochs": "repeat"},
              "model": {"preset": "tiny", "init_from_hf": None}}
    saved = state(model=model, config=config)
    runtime = dataclasses.replace(saved, model=dict(model, attention="sdpa", activation_checkpointing=True))
    assert ckpt.check_compatible(saved, runtime, tmp_path, force=False) == []
    for change, expected in [
            ({"model": dict(model, rope_base=500000.0)}, "model: rope_base 10000.0 -> 500000.0"),
            ({"model": dict(model, rotary_pct=1.0)}, "model: rotary_pct 0.25 -> 1.0"),
            ({"model": dict(model, num_layers=3)}, "model: num_layers 2 -> 3"),
            ({"model": dict(model, vocab_size=2000)}, "model: vocab_size 1000 -> 2000"),
            ({"config": dict(config, model={"preset": "tiny", "init_from_hf": "hf/pythia"})},
             "model: init_from_hf None -> 'hf/pythia'"),
            ({"config": dict(config, data={"valid_fraction": 0.05, "epochs": "repeat"})},
             "data.valid_fraction: 0.01 -> 0.05"),
            ({"config": dict(config, data={"valid_fraction": 0.01, "epochs": "error"})},
             "data.epochs: 'repeat' -> 'error' (changes the data order; to continue this run set data.epochs=\"repeat\")")]:
        with pytest.raises(ckpt.CheckpointError, match="cannot resume from") as e:
            ckpt.check_compatible(saved, dataclasses.replace(saved, **change), tmp_path, force=False)
        assert expected in str(e.value)


def _save_like_the_launcher(root, step, world=1):
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for r in range(world):
        (path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
        ckpt.save_rng(path, r)
    ckpt.write_state(path, state(step=step, world_size=world, files=ckpt.file_sizes(path),
                                 sha256=ckpt.file_digests(path)))
    return path


def test_a_corrupted_checkpoint_of_the_right_size_is_skipped_for_the_previous_one(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    first, second = (_save_like_the_launcher(root, s, world=2) for s in (4, 8))
    shard = second / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"o" * 49 + b"X")  # one byte flipped, the size unchanged
    path, warnings = ckpt.choose("auto", tmp_path, world_size=2)
    assert path == first and len(warnings) == 1
    assert f"skipping checkpoint step_00000008: {shard} has another SHA-256 than when it was saved" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="has another SHA-256 .* resume from an earlier checkpoint"):
        ckpt.choose(str(second), tmp_path, world_size=2)


def test_damaged_checkpoints_are_named_and_skipped_for_the_previous_complete_one(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    first, second, third, fourth = (_save_like_the_launcher(root, s, world=2) for s in (4, 8, 12, 16))
    assert ckpt.choose("auto", tmp_path, world_size=2) == (fourth, [])
    (fourth / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)        # truncated by a full disk
    (third / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()       # a lost optimizer shard
    (second / ckpt.STATE_FILE).write_text('{"step": 8, "wor')              # a torn state file
    path, warnings = ckpt.choose("auto", tmp_path, world_size=2)
    assert path == first
    assert "skipping checkpoint step_00000016" in warnings[0] and "has 10 bytes, 100 when it was saved" in warnings[0]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in warnings[1]
    assert "growlength_state.json is unreadable" in warnings[2]
    with pytest.raises(ckpt.CheckpointError, match="step_00000016/mp_rank_00_model_states.pt has 10 bytes"):
        ckpt.choose(str(fourth), tmp_path, world_size=2)  # an explicit choice is not replaced silently
    (first / "rng_rank1.pt").write_bytes(b"torn")
    path, warnings = ckpt.choose("auto", tmp_path, world_size=2)
    assert path is None and len(warnings) == 4 and "rng_rank1.pt has 4 bytes" in warnings[3]


def test_state_round_trip_and_one_line_refusals(tmp_path):
    """The record comes back as written; another version, a missing or an unknown field is refused naming the file."""
    written = state(step=7, tokens_seen=7168, stage_seconds={"0": 1.5}, files={"a.pt": 3})
    ckpt.write_state(tmp_path, written)
    assert ckpt.read_state(tmp_path) == written
    f = tmp_path / ckpt.STATE_FILE
    raw = json.loads(f.read_text())
    for broken, message in [
            ({**raw, "version": 1}, r"growlength_state.json: checkpoint state version 1, this launcher reads version 2"),
            ({k: v for k, v in raw.items() if k != "version"}, "checkpoint state version None"),
            ({k: v for k, v in raw.items() if k not in ("seed", "plan")},
             r"growlength_state.json: not a version 2 checkpoint state \(missing plan, seed; unknown nothing\)"),
            ({**raw, "stage_cursor": 3}, r"\(missing nothing; unknown stage_cursor\)"),
            ([1, 2], "is not a growlength checkpoint state")]:
        f.write_text(json.dumps(broken))
        with pytest.raises(ckpt.CheckpointError, match=message) as e:
            ckpt.read_state(tmp_path)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
        assert ckpt.problem(tmp_path) == str(e.value).split("; use another checkpoint")[0]  # skipped by auto-resume
