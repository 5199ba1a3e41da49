"""Nothing wrong is ever saved or loaded (1 CPU rank, the real engine): a step with a non-finite loss stops the run
before it is logged or checkpointed, and a checkpoint whose bytes changed (same size) is skipped for the previous
one with one warning."""
import torch

from launcher import checkpoint as ckpt
from launcher import pretrain

from runner import ok, steps


def test_nan_stops_before_saving_and_a_corrupted_checkpoint_is_skipped(train, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = train(run_dir, tokenized, sp_model, ranks=1, fault="nan@10")
    assert proc.returncode == pretrain.EXIT_DIVERGED, proc.stdout[-3000:]
    assert "training diverged at step 10: loss nan" in proc.stdout
    root = ckpt.checkpoint_root(run_dir)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == [ckpt.tag_for(s) for s in (4, 6, 8)]
    assert not (root / ckpt.tag_for(10)).exists()
    assert max(steps(run_dir)) == 9  # step 10 was never logged
    weights = torch.load(root / ckpt.tag_for(8) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(w).all() for w in weights.values())

    shard = root / ckpt.tag_for(8) / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped, the size unchanged
    shard.write_bytes(bytes(data))
    proc = ok(train(run_dir, tokenized, sp_model, ranks=1))
    warnings = [line for line in proc.stdout.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and f"{shard} has another SHA-256 than when it was saved" in warnings[0]
    assert "step_00000006 at step 6" in proc.stdout
    assert sorted(steps(run_dir)) == list(range(1, 19))
