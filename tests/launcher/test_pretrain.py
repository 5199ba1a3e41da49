"""The launcher end to end on 2 CPU ranks (real DeepSpeed ZeRO-2 engine, gloo): GrowLength stages with constant
tokens per step, exact resume after SIGKILL mid-stage and at a stage boundary, preemption by signal."""
import json

import pytest

from launcher import checkpoint as ckpt
from launcher.metrics import read_metrics

import stepclock
from launching import pretrain_args
from runner import ok, steps


@pytest.fixture(scope="module")
def reference(train, tmp_path_factory, tokenized, sp_model):
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    proc = ok(train(run_dir, tokenized, sp_model))
    return run_dir, proc.stdout


def test_stages_keep_tokens_per_step_and_log_everything(reference):
    run_dir, out = reference
    records = steps(run_dir)
    assert sorted(records) == list(range(1, 19))
    for s, (seq_len, mb) in enumerate([(32, 16), (64, 8), (128, 4)]):
        for step in range(6 * s + 1, 6 * s + 7):
            r = records[step]
            assert (r["stage"], r["seq_len"], r["micro_batch_size"]) == (s, seq_len, mb)
            assert r["micro_batch_size"] * r["seq_len"] * r["grad_accum"] * 2 == r["tokens_per_step"] == 1024
            assert r["tokens_seen"] == 1024 * step
            assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None
    assert records[18]["loss"] < records[1]["loss"] - 0.5  # it learns
    kinds = [r for r in read_metrics(run_dir) if r.get("kind") == "stage"]
    assert [(r["step"], r["seq_len"]) for r in kinds] == [(0, 32), (6, 64), (12, 128)]
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [6, 12, 18]
    assert all("val_loss_128" in e for e in evals) and "val_loss_32" in evals[0]
    # the printed plan table, the step line's fixed fields, the stage switch line and the summary
    assert "tokens_per_step 1,024 x 18 steps = 18,432 tokens on 2 rank(s)" in out
    assert "step 7 | stage 1 L=64 mb=8 | loss" in out and "| lr " in out and "| tok/s " in out
    assert "stage 1: seq_len 64, micro_batch 8 x accum 1 x 2 ranks = 1024 tokens/step" in out
    assert "grown from 32" in out and "done: 18 steps, 18,432 tokens" in out
    resolved = json.loads((run_dir / "ds_config.resolved.json").read_text())
    assert resolved["train_micro_batch_size_per_gpu"] == 16 and resolved["scheduler"]["params"]["total_num_steps"] == 18
    names = [p.name for p in ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir))]
    assert names == [ckpt.tag_for(s) for s in (4, 6, 8, 12, 16, 18)]
    assert (run_dir / "train.log").is_file()


def assert_same_losses(run_dir, reference_dir, after: int):
    got, want = steps(run_dir), steps(reference_dir)
    assert sorted(got) == sorted(want)  # every step exactly once, even those redone after the kill
    def switches(d):
        return [(r["step"], r["seq_len"]) for r in read_metrics(d) if r.get("kind") == "stage"]
    assert switches(run_dir) == switches(reference_dir) == [(0, 32), (6, 64), (12, 128)]
    for s in range(after + 1, 19):
        assert got[s]["loss"] == want[s]["loss"], f"step {s}: {got[s]['loss']} != {want[s]['loss']}"
        assert got[s]["grad_norm"] == want[s]["grad_norm"]
        assert got[s]["lr"] == want[s]["lr"]


def test_sigkill_mid_stage_resumes_exactly(train, reference, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = train(run_dir, tokenized, sp_model, fault="kill@10")
    assert proc.returncode != 0
    assert max(steps(run_dir)) == 10  # steps 9-10 were logged but not checkpointed
    proc = ok(train(run_dir, tokenized, sp_model))
    assert "resumed from" in proc.stdout and "step_00000008 at step 8" in proc.stdout
    assert "resumed mid-stage" in proc.stdout
    assert_same_losses(run_dir, reference[0], after=8)


def test_sigkill_during_save_at_boundary_resumes_exactly(train, reference, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = train(run_dir, tokenized, sp_model, fault="kill-in-save@8")
    assert proc.returncode != 0
    half = ckpt.checkpoint_root(run_dir) / ckpt.tag_for(8)
    assert half.is_dir() and not (half / ckpt.STATE_FILE).exists()  # DeepSpeed wrote, our marker did not
    proc = ok(train(run_dir, tokenized, sp_model))
    assert "step_00000006 at step 6" in proc.stdout  # the stage boundary, not the half-written step 8
    assert "stage 1: seq_len 64" in proc.stdout
    assert_same_losses(run_dir, reference[0], after=6)
    assert (half / ckpt.STATE_FILE).is_file()  # rewritten whole on the second pass


def test_signal_on_one_rank_checkpoints_all_and_exits_for_requeue(train, reference, tmp_path, tokenized, sp_model):
    run_dir = tmp_path / "run"
    proc = train(run_dir, tokenized, sp_model, fault="sigusr1@10")
    assert proc.returncode == 75, proc.stdout[-3000:]
    assert "preempted: checkpoint at step 11 saved" in proc.stdout
    assert ckpt.resolve_resume("auto", run_dir).name == ckpt.tag_for(11)
    ok(train(run_dir, tokenized, sp_model))
    assert_same_losses(run_dir, reference[0], after=11)


def test_resume_with_another_plan_is_refused(train, reference, tmp_path, tokenized, sp_model):
    proc = train(reference[0], tokenized, sp_model, "growlength.tokens_per_step=2048", ranks=1)
    assert proc.returncode == 2
    assert "cannot resume from" in proc.stdout and "world size: checkpoint 2 ranks, this run 1" in proc.stdout
    assert "stage plan: stages (seq_len, steps) [(32, 6), (64, 6), (128, 6)] -> [(32, 3), (64, 3), (128, 3)]" \
        in proc.stdout
    assert "--resume-force" in proc.stdout


def test_export_to_hugging_face(reference, tmp_path, sp_model):
    transformers = pytest.importorskip("transformers")
    import torch
    from data_pipeline.tokenizer import Tokenizer
    from evidence.export_hf import export, load_trained_model

    out = export(str(reference[0]), str(tmp_path / "hf"))
    ours, state, found = load_trained_model(reference[0])
    assert found.name == ckpt.tag_for(18) and state.step == 18
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM"
    text = "The with statement is used to wrap the execution of a block"
    ids = transformers.AutoTokenizer.from_pretrained(out)(text).input_ids
    assert ids == Tokenizer(sp_model).encode(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert torch.allclose(a[..., :b.shape[-1]], b, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export(str(reference[0]), str(out))


def test_wall_clock_plan_and_time_budget_on_one_rank(launch, tmp_path, tokenized, sp_model):
    """time_share stages are resolved by a step-time probe and recorded; max_time_s stops with a checkpoint at the
    first step whose clock check is past it (the run on a step clock: 0.3 s per step at L=32, whatever the machine
    does; the probe on the real one, its times read back from the log)."""
    run_dir = tmp_path / "run"
    stages = "growlength.stages=[{seq_len: 32, time_share: 0.5}, {seq_len: 128, time_share: 0.5}]"
    proc = ok(launch(pretrain_args(run_dir, tokenized, sp_model, "checkpointing.interval_steps=4",
                                   "growlength.tokens_per_step=1024", stages, "growlength.total_tokens=409600",
                                   "logging.tensorboard=true", "growlength.max_time_s=2"),
                     script=stepclock.SCRIPT, env=stepclock.env({32: 0.3, 128: 1.0})))
    assert "step-time probe: L=32:" in proc.stdout
    state = ckpt.read_state(ckpt.resolve_resume("auto", run_dir))
    planned = [s["steps"] for s in state.plan]
    # equal time shares: steps in inverse proportion to the probed step times (rounding aside)
    import re
    t32, t128 = map(float, re.search(r"step-time probe: L=32: ([\d.]+)s, L=128: ([\d.]+)s", proc.stdout).groups())
    assert sum(planned) == 400
    assert abs(planned[0] - 400 * t128 / (t32 + t128)) <= 1
    # the clock after each step: 0.3, 0.6, ..., 1.8 (step 6, under the budget), 2.1 (step 7, past it): stop there
    assert "growlength.max_time_s=2 s reached at step 7" in proc.stdout
    records = steps(run_dir)
    assert state.step == max(records) == 7 and planned[0] > 7
    assert records[6]["elapsed_s"] == pytest.approx(1.8) and records[7]["elapsed_s"] == pytest.approx(2.1)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_offload_config_and_accumulation_chosen_from_a_memory_probe(train, tmp_path, tokenized, sp_model):
    """ZeRO-2 with optimizer offload through a switch where the accumulation changes too (1 -> 4), as a
    bench_lengths probe asks: the long stage fits only 512 tokens per micro-batch."""
    run_dir = tmp_path / "run"
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"lengths": [{"seq_len": 32, "max_tokens_per_batch": 4096},
                                             {"seq_len": 64, "max_tokens_per_batch": 512}]}))
    proc = ok(train(run_dir, tokenized, sp_model, "growlength.stages=[{seq_len: 32, tokens: 2048}, "
                    "{seq_len: 64, tokens: 2048}]", "growlength.grad_accum=null",
                    f"growlength.micro_batch_probe={probe}", ranks=1, ds_config="ds_configs/zero2_offload.json"))
    records = steps(run_dir)
    assert [(r["seq_len"], r["micro_batch_size"], r["grad_accum"]) for r in records.values()] == \
        [(32, 32, 1), (32, 32, 1), (64, 4, 4), (64, 4, 4)]
    assert "stage 1: seq_len 64, micro_batch 4 x accum 4 x 1 ranks = 1024 tokens/step" in proc.stdout
    import torch
    final = ckpt.resolve_resume("auto", run_dir)
    ds_state = torch.load(final / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    assert ds_state["global_steps"] == 4  # 4 optimizer steps, not one per micro-batch: accumulation took effect
    assert json.loads((run_dir / "ds_config.resolved.json").read_text())["zero_optimization"]["offload_optimizer"]
