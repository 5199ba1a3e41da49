"""A stage switch that changes the gradient accumulation, on 2 CPU ranks in fp32 (real DeepSpeed ZeRO-2, gloo).

Stage 0 runs an odd number of steps at accumulation 1; stage 1 then accumulates 4 micro-batches per step (its own
``max_tokens_per_micro_batch``). The same plan at accumulation 1 everywhere is the reference: equal tokens per
step, so every step must see the same gradients and give the same loss up to fp32 rounding. DeepSpeed's own
boundary rule (micro-batches counted over the whole run) would put stage 1's updates one micro-batch off, mixing
two trainer steps per update. Also: the logged learning rate is the one the step used, and weight decay skips
biases and norm gains inside the real DeepSpeed optimizer.
"""
import json

import pytest

from launcher import checkpoint as ckpt

from launching import ZERO2
from runner import ok, steps

STAGES = "growlength.stages=[{seq_len: 32, tokens: 3072}, {seq_len: 64, tokens: 6144%s}]"
ACCUM4 = [STAGES % ", max_tokens_per_micro_batch: 128", "growlength.grad_accum=null"]
ACCUM1 = [STAGES % "", "growlength.grad_accum=null"]
WARMUP = 4


@pytest.fixture(scope="module")
def fp32_config(tmp_path_factory):
    cfg = json.loads(ZERO2.read_text())
    cfg["bf16"] = {"enabled": False}
    path = tmp_path_factory.mktemp("ds") / "zero2_fp32.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run(train, run_dir, tokenized, sp_model, ds_config, plan, **kw):
    return train(run_dir, tokenized, sp_model, *plan, f"optimisation.warmup_steps={WARMUP}",
                 "checkpointing.interval_steps=5", ds_config=ds_config, **kw)


@pytest.fixture(scope="module")
def accum4(train, tmp_path_factory, tokenized, sp_model, fp32_config):
    run_dir = tmp_path_factory.mktemp("switch") / "accum4"
    proc = ok(run(train, run_dir, tokenized, sp_model, fp32_config, ACCUM4))
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def accum1(train, tmp_path_factory, tokenized, sp_model, fp32_config):
    run_dir = tmp_path_factory.mktemp("switch") / "accum1"
    ok(run(train, run_dir, tokenized, sp_model, fp32_config, ACCUM1))
    return run_dir


def test_accumulation_change_gives_the_same_training(accum4, accum1):
    got, want = steps(accum4[0]), steps(accum1)
    assert sorted(got) == sorted(want) == list(range(1, 10))
    assert [(r["micro_batch_size"], r["grad_accum"]) for r in got.values()] == [(16, 1)] * 3 + [(2, 4)] * 6
    assert [(r["micro_batch_size"], r["grad_accum"]) for r in want.values()] == [(16, 1)] * 3 + [(8, 1)] * 6
    for s in range(1, 10):
        # the same gradients summed in another order: fp32 rounding only (the bug gave 5e-3)
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=2e-5, abs=0), s
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4, abs=0), s
    assert "stage 1: seq_len 64, micro_batch 2 x accum 4 x 2 ranks = 1024 tokens/step" in accum4[1]
    # DeepSpeed took exactly one optimizer step per trainer step
    import torch
    final = ckpt.resolve_resume("auto", accum4[0])
    ds_state = torch.load(final / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    assert ds_state["global_steps"] == 9


def test_resume_inside_the_accumulating_stage_is_exact(train, accum4, tmp_path, tokenized, sp_model, fp32_config):
    run_dir = tmp_path / "run"
    proc = run(train, run_dir, tokenized, sp_model, fp32_config, ACCUM4, fault="kill@7")
    assert proc.returncode != 0
    proc = ok(run(train, run_dir, tokenized, sp_model, fp32_config, ACCUM4))
    assert "step_00000005 at step 5" in proc.stdout and "resumed mid-stage" in proc.stdout
    got, want = steps(run_dir), steps(accum4[0])
    assert sorted(got) == sorted(want)
    for s in range(6, 10):
        assert (got[s]["loss"], got[s]["grad_norm"], got[s]["lr"]) == \
            (want[s]["loss"], want[s]["grad_norm"], want[s]["lr"]), s


def test_logged_lr_is_the_rate_the_step_used(accum1):
    """WarmupDecayLR from ds_configs/zero2.json: linear warmup from warmup_min_lr 0 to warmup_max_lr 1e-3 over
    WARMUP steps, the rate of optimizer step k (1-based) being 1e-3 * (k - 1) / WARMUP, then linear decay to 0 at
    the last step (total 9)."""
    got = steps(accum1)
    max_lr, total = 1e-3, 9
    for k in range(1, 10):
        i = k - 1  # the scheduler's iteration when step k runs
        want = max_lr * i / WARMUP if i < WARMUP else max_lr * (total - i) / (total - WARMUP)
        assert got[k]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), k


def test_weight_decay_skips_biases_and_norms_in_deepspeeds_optimizer(accum4):
    """The groups logged at start-up, and the real optimizer state: DeepSpeed's ZeRO-2 optimizer saves its
    torch AdamW's param_groups, with the JSON's weight_decay on the matrices and 0 on the rest."""
    import torch
    run_dir, out = accum4
    assert "weight decay 0.1: decayed 10 tensors" in out and "not decayed 18 tensors" in out
    final = ckpt.resolve_resume("auto", run_dir)
    optim = torch.load(final / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False,
                       map_location="cpu")["optimizer_state_dict"]
    groups = optim["base_optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, plain = groups[0]["names"], groups[1]["names"]
    assert {"embed_in.weight", "embed_out.weight", "layers.0.attention.query_key_value.weight"} <= set(decayed)
    assert {"layers.0.attention.query_key_value.bias", "layers.0.input_layernorm.weight",
            "final_layer_norm.bias"} <= set(plain)
    assert not any(n.endswith(".bias") or "layernorm" in n or "layer_norm" in n for n in decayed)
