"""model.document_masking through the launcher: in this process on 1 rank (fp32 engine) the step loss and the
attention FLOPs equal what an independent computation gives from the windows' EOD positions, in-loop validation
and evidence.evaluate agree (and differ from unmasked attention), the export says how it was trained; on 2 real
ranks (deepspeed runner, bf16 ZeRO-2) a run killed and resumed gives exactly the losses of one that never stopped."""
import json

import numpy as np
import pytest
import torch

from data_pipeline.samples import GrowLengthSamples
from data_pipeline.tokenizer import Tokenizer
from evidence import evaluate
from launcher.metrics import read_metrics
from model import CausalLM, ModelConfig

from launching import ZERO2
from runner import assert_refused, ok, steps

MASKING = ["model.document_masking=true", "model.reset_position_ids=true"]
STAGES = "growlength.stages=[{seq_len: 32, tokens: 2048}, {seq_len: 64, tokens: 2048}]"


def eod_cu_seqlens(windows: np.ndarray, eod: int) -> torch.Tensor:
    """The reference boundaries: a document starts after every EOD among a window's inputs."""
    n, L = windows.shape[0], windows.shape[1] - 1
    cu = [r * L + t for r in range(n) for t in range(L) if t == 0 or windows[r, t - 1] == eod] + [n * L]
    return torch.tensor(cu, dtype=torch.int32)


@pytest.fixture(scope="module")
def fp32_ds_config(tmp_path_factory):
    config = json.loads(ZERO2.read_text())
    config["bf16"]["enabled"] = False  # fp32: the engine's losses equal an fp32 reference computed here
    path = tmp_path_factory.mktemp("ds") / "zero2_fp32.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_masked_run_loss_flops_validation_evaluate_and_export(run, fp32_ds_config, tokenized, sp_model, tmp_path):
    code, out = run(*MASKING, STAGES, "logging.eval_tokens=1024", "logging.log_interval=1",
                    ds_config=fp32_ds_config)
    assert code == 0, out
    assert "attention torch SDPA(dense block-causal mask within documents, CPU), positions reset per document" in out
    records = [r for r in read_metrics(run.run_dir) if "kind" not in r]
    assert [r["seq_len"] for r in records] == [32, 32, 64, 64]
    # step 1 independently: the initial weights, the stage's first 32 windows, boundaries from their EODs
    eod = Tokenizer(sp_model).eod_id
    samples = GrowLengthSamples(tokenized, [(32, 2048), (64, 2048)], seed=1234, valid_fraction=0.1)
    windows = samples.samples(0, np.arange(32))
    cu = eod_cu_seqlens(windows, eod)
    assert len(cu) > 33  # documents do start inside these windows
    torch.manual_seed(1234)
    config = ModelConfig.from_preset("tiny", vocab_size=Tokenizer(sp_model).vocab_size, document_masking=True,
                                     reset_position_ids=True)
    model = CausalLM(config)
    x = torch.from_numpy(windows)
    with torch.no_grad():
        masked = model(x[:, :-1], labels=x[:, 1:], cu_seqlens=cu).item()
        unmasked = model(x[:, :-1], labels=x[:, 1:]).item()
    assert records[0]["loss"] == pytest.approx(masked, abs=1e-6)
    assert abs(records[0]["loss"] - unmasked) > 1e-4  # what the engine computed was masked
    # FLOPs: the attention computed (causal, within documents) and PaLM's full square, beside it
    lengths = (cu[1:] - cu[:-1]).long()
    pairs = int((lengths * (lengths + 1) // 2).sum())
    L, d = config.num_layers, config.hidden_size
    assert records[0]["attn_flops"] == 12 * L * d * pairs
    assert records[0]["attn_flops_palm"] == 12 * L * d * 1024 * 32
    assert records[0]["tflops"] < records[0]["tflops_palm"] and records[0]["mfu"] is None
    # validation in the loop = evidence.evaluate, both masked
    final = [r for r in read_metrics(run.run_dir) if r.get("kind") == "eval"][-1]
    report = evaluate.evaluate(str(run.run_dir), lengths=[64])
    assert report["document_masking"] is True
    assert report["results"][0]["loss"] == pytest.approx(final["val_loss_64"], abs=1e-5)
    loaded = evaluate.load_for_eval(str(run.run_dir))
    from data_pipeline.loader import window_batches
    from model.model import mean_loss
    unmasked = window_batches(samples.validation, 64, 1024 // 64, 8192)  # no document boundaries
    plain_sum, plain_n = mean_loss(loaded.model, unmasked, torch.device("cpu"))
    assert abs(plain_sum / plain_n - final["val_loss_64"]) > 1e-4
    # the export's model card and config say how it was trained; evaluating the export masks the same way
    from evidence.export_hf import export
    hf = export(str(run.run_dir), str(tmp_path / "hf"))
    card = (hf / "README.md").read_text()
    assert "Trained with document masking" in card and "reset position ids" in card
    assert json.loads((hf / "config.json").read_text())["growlength"] == {"document_masking": True,
                                                                        "reset_position_ids": True}
    from_hf = evaluate.evaluate(str(hf), data_prefix=tokenized, lengths=[64], split="run", valid_fraction=0.1,
                                tokens=1024)
    assert from_hf["document_masking"] and from_hf["results"][0]["loss"] == pytest.approx(final["val_loss_64"],
                                                                                          abs=1e-5)


def test_reset_position_ids_without_masking_is_refused(run):
    assert_refused(run("model.reset_position_ids=true"),
                   "reset_position_ids=True needs document_masking=True", run.run_dir)


def test_masked_two_rank_run_killed_and_resumed_gives_the_same_losses(train, tmp_path, tokenized, sp_model):
    plan = ["growlength.tokens_per_step=1024", STAGES.replace("2048", "4096"), "checkpointing.interval_steps=3",
            *MASKING]  # 8 steps: 32 x 4 steps, 64 x 4 steps; checkpoints at 3 and 6
    reference = tmp_path / "reference"
    ok(train(reference, tokenized, sp_model, *plan))
    killed = tmp_path / "killed"
    proc = train(killed, tokenized, sp_model, *plan, fault="kill@7")
    assert proc.returncode != 0
    resumed = ok(train(killed, tokenized, sp_model, *plan))
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout  # mid-stage 1
    got, want = steps(killed), steps(reference)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for s in range(1, 9):
        assert got[s]["loss"] == want[s]["loss"], f"step {s}"
        assert got[s]["grad_norm"] == want[s]["grad_norm"] and got[s]["attn_flops"] == want[s]["attn_flops"]
    # summed over both ranks: at most the causal count (PaLM's square x (T + 1) / 2T), below it where documents start
    causal = [r["attn_flops_palm"] * (r["seq_len"] + 1) / (2 * r["seq_len"]) for r in want.values()]
    assert all(r["attn_flops"] <= c for r, c in zip(want.values(), causal))
    assert sum(r["attn_flops"] for r in want.values()) < sum(causal)
    assert all(np.isfinite(r["loss"]) for r in got.values())


def test_validation_batches_carry_their_own_boundaries_on_every_rank(tokenized, sp_model):
    from launcher.data import TrainData

    eod = Tokenizer(sp_model).eod_id
    samples = GrowLengthSamples(tokenized, [(32, 2048)], seed=1234, valid_fraction=0.1)
    from launcher.config import from_dict
    cfg = from_dict({"model": {"document_masking": True}})
    seen, interior = [], 0
    for rank in range(2):
        data = TrainData(cfg=cfg, prefix=tokenized, tokenizer_path=sp_model, tokenizer=None, fingerprint="",
                         rank=rank, world=2, samples=samples)
        for tokens, cu in data.valid_batches(48, eval_tokens=48 * 20, tokens_per_batch=48 * 3):
            assert cu.tolist() == eod_cu_seqlens(tokens.numpy(), eod).tolist()
            seen += [tuple(row) for row in tokens.tolist()]
            interior += len(cu) - 1 - len(tokens)
    assert interior > 0  # documents do start inside some of these windows
    assert sorted(seen) == sorted(map(tuple, samples.validation.windows(48, 20).tolist()))  # each window once
