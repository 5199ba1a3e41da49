"""A checkpoint save that the filesystem refuses (a full disk: torch.save's zip writer fails with a raw iostream
RuntimeError) ends the run with one line naming the checkpoint and the fix, never a traceback, and leaves the
previous checkpoint whole (in process, 1 rank, the real engine)."""
import torch

from launcher import checkpoint as ckpt
from launcher import pretrain


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run, monkeypatch):
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(str(f))
        if ckpt.tag_for(2) in str(f):  # the disk fills up during the second save
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, out = run("checkpointing.interval_steps=1")
    root = ckpt.checkpoint_root(run.run_dir)
    assert code == pretrain.EXIT_BAD_INPUT, out
    assert f"checkpoint {root / ckpt.tag_for(2)} could not be written (basic_ios::clear: iostream error)" in out
    assert "--resume auto" in out and "Traceback" not in out
    assert ckpt.complete_checkpoints(root) == [root / ckpt.tag_for(1)]
    assert ckpt.problem(root / ckpt.tag_for(1)) is None  # sizes and SHA-256 as saved
    assert any(ckpt.tag_for(2) in s for s in saves)
