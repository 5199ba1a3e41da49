"""Core model tests: config validation, shapes, loss, training signal, FLOPs, checkpointing. CPU fp32."""
import math

import pytest
import torch

from model import CausalLM, ModelConfig, PRESETS

from model_checks import assert_checkpointing_changes_nothing


def tiny(**overrides):
    return ModelConfig.from_preset("tiny", vocab_size=300, **overrides)


# ---------------------------------------------------------------- config
def test_presets_have_pythias_published_dims():
    dims = {n: (p["num_layers"], p["hidden_size"], p["num_heads"]) for n, p in PRESETS.items()}
    assert dims["pythia-70m"] == (6, 512, 8)
    assert dims["pythia-160m"] == (12, 768, 12)
    assert dims["pythia-410m"] == (24, 1024, 16)
    assert dims["pythia-1b"] == (16, 2048, 8)
    c = ModelConfig.from_preset("pythia-70m", vocab_size=50277)
    assert (c.intermediate_size, c.rotary_pct, c.rotary_dim, c.rope_base) == (2048, 0.25, 16, 10000)
    assert c.padded_vocab_size == 50304  # Pythia's own padded embedding size
    # Pythia's published total parameter counts (model cards / Biderman et al. 2023, Table 1).
    published = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
                 "pythia-1b": 1_011_781_632}
    for name, n in published.items():
        with torch.device("meta"):
            assert CausalLM(ModelConfig.from_preset(name, vocab_size=50277)).num_params() == n, name


def test_padded_vocab_is_a_multiple_of_128_and_keeps_tokenizer_size():
    c = tiny()
    assert (c.vocab_size, c.padded_vocab_size) == (300, 384)
    assert ModelConfig.from_preset("tiny", vocab_size=256).padded_vocab_size == 256
    assert CausalLM(c).embed_in.weight.shape == (384, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rotary_pct=0.0), r"rotary_pct=0.0: must be in \(0, 1\]"),
    (dict(rotary_pct=1.5), r"rotary_pct=1.5: must be in \(0, 1\]"),
    (dict(hidden_size=60, num_heads=4), r"rotary dims = int\(head_dim 15 \* rotary_pct 0.25\) = 3.*must be even"),
    (dict(hidden_size=60, num_heads=4, rotary_pct=1.0), r"= 15.*change rotary_pct or hidden_size/num_heads"),
    (dict(hidden_size=64, num_heads=5), r"hidden_size=64 is not divisible by num_heads=5"),
    (dict(rope_scaling="yarn"), r"rope_scaling='yarn': choose one of none, linear, ntk"),
    (dict(rope_scaling_factor=0.5), r"rope_scaling_factor=0.5: must be >= 1"),
    (dict(attention="xformers"), r"attention='xformers': choose one of auto, flash, sdpa"),
    (dict(num_layers=0), r"num_layers=0: must be >= 1"),
    (dict(init_std=-1.0), r"init_std=-1.0: must be > 0"),
])
def test_bad_configs_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError, match=r"(?s)rope_scaling='x'.*attention='y'"):
        tiny(rope_scaling="x", attention="y")


def test_ntk_needs_more_than_two_rotary_dims():
    with pytest.raises(ValueError, match=r"rope_scaling='ntk' needs more than 2 rotary dims"):
        tiny(hidden_size=32, num_heads=4, rope_scaling="ntk", rope_scaling_factor=2.0)


def test_unknown_preset_and_unknown_override():
    with pytest.raises(ValueError, match=r"unknown model preset 'pythia-7b': choose one of tiny, narrow-4x128, pythia-70m"):
        ModelConfig.from_preset("pythia-7b", vocab_size=300)
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['n_layer'\]: valid fields are"):
        ModelConfig.from_preset("tiny", vocab_size=300, n_layer=3)


# ---------------------------------------------------------------- forward, loss, training
def test_shapes_and_loss_dtype():
    torch.manual_seed(0)
    m = CausalLM(tiny())
    x = torch.randint(0, 300, (3, 17))
    logits = m(x)
    assert logits.shape == (3, 17, 384) and logits.dtype == torch.float32
    loss = m(x, labels=x)
    assert loss.shape == () and loss.dtype == torch.float32


def test_bf16_model_returns_fp32_loss_and_bf16_logits():
    torch.manual_seed(0)
    m = CausalLM(tiny()).to(torch.bfloat16)
    x = torch.randint(0, 300, (2, 16))
    assert m(x).dtype == torch.bfloat16
    loss = m(x, labels=x)
    assert loss.dtype == torch.float32
    assert m.rotary.cos.dtype == torch.float32  # the RoPE tables are not rounded by .to(bf16)
    loss.backward()
    assert m.embed_in.weight.grad.dtype == torch.bfloat16


def test_initial_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    m = CausalLM(tiny())
    x = torch.randint(0, 300, (4, 64))
    loss = m(x, labels=torch.roll(x, -1, dims=1)).item()
    assert abs(loss - math.log(384)) < 0.5, loss


def test_labels_minus_100_are_ignored():
    torch.manual_seed(0)
    m = CausalLM(tiny())
    x = torch.randint(0, 300, (2, 12))
    labels = torch.randint(0, 300, (2, 12))
    masked = labels.clone()
    masked[:, 6:] = -100
    logits = m(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, 384), labels[:, :6].reshape(-1))
    torch.testing.assert_close(m(x, labels=masked), expected)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = CausalLM(tiny())
    x = torch.randint(0, 300, (4, 33))
    inputs, labels = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = m(inputs, labels=labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.1, (first, loss.item())


def test_runs_at_lengths_never_seen_and_is_causal():
    torch.manual_seed(0)
    m = CausalLM(tiny()).eval()
    x = torch.randint(0, 300, (1, 300))
    with torch.no_grad():
        long = m(x)
        short = m(x[:, :40])
    assert m.rotary.cos.shape[0] == 300
    # Causal: the first 40 positions do not see the rest, and the table grown to 300 did not change them.
    torch.testing.assert_close(long[:, :40], short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parallel", [True, False])
def test_activation_checkpointing_gives_identical_loss_and_grads(parallel):
    torch.manual_seed(0)
    a = CausalLM(tiny(use_parallel_residual=parallel))
    b = CausalLM(tiny(use_parallel_residual=parallel, activation_checkpointing=True))
    assert_checkpointing_changes_nothing(a, b)


def test_pythia_init_stds():
    torch.manual_seed(0)
    c = ModelConfig.from_preset("pythia-70m", vocab_size=50277, num_layers=2)
    m = CausalLM(c)
    small, wang = math.sqrt(2 / (5 * 512)), 2 / (2 * math.sqrt(512))
    assert m.layers[0].attention.query_key_value.weight.std().item() == pytest.approx(small, rel=0.02)
    assert m.embed_out.weight.std().item() == pytest.approx(small, rel=0.02)
    assert m.layers[1].mlp.dense_4h_to_h.weight.std().item() == pytest.approx(wang, rel=0.02)
    assert m.layers[1].attention.dense.bias.abs().max().item() == 0.0
    assert m.final_layer_norm.weight.min().item() == 1.0


# ---------------------------------------------------------------- counting
def test_num_params_and_flops_per_token():
    c = tiny()
    m = CausalLM(c)
    d, L, V, ff = 64, 2, 384, 256
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    assert m.num_params() == V * d + L * per_layer + 2 * d + d * V
    assert m.num_params(exclude_embeddings=True) == L * per_layer + 2 * d
    n_matmul = L * (4 * d * d + 2 * d * ff) + d * V
    assert m.flops_per_token(128) == 3 * (2 * n_matmul + 4 * L * d * 128)
    # The attention term grows linearly with length: 12 * L * d per extra position.
    assert m.flops_per_token(1024) - m.flops_per_token(512) == 12 * L * d * 512


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, None])  # several chunks; the default budget (one chunk here)
def test_chunked_cross_entropy_matches_torch_loss_and_grad(dtype, rows, monkeypatch):
    from model.model import _ChunkedCrossEntropy, cross_entropy_fp32

    assert _ChunkedCrossEntropy.rows_per_chunk(50304) > 4096  # Pythia's vocabulary: thousands of rows per chunk
    if rows:
        monkeypatch.setattr(_ChunkedCrossEntropy, "CHUNK_BYTES", 4 * 384 * rows)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 20, 384)).to(dtype).requires_grad_()
    labels = torch.randint(0, 384, (3, 20))
    labels[0, :5] = -100
    ref_logits = logits.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.view(-1, 384), labels.view(-1), ignore_index=-100)
    ours = cross_entropy_fp32(logits, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (2 * ours).backward()
    (2 * ref).backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("rows", [7, None])
def test_z_loss_matches_plain_torch_value_and_grad(rows, monkeypatch):
    """CE + z * mean(logsumexp^2) over the valid labels, written in plain PyTorch, against the chunked function and
    the model's training forward (which adds the penalty only in training, and keeps it apart for the logs)."""
    from model.model import _ChunkedCrossEntropy, cross_entropy_and_z_fp32

    if rows:
        monkeypatch.setattr(_ChunkedCrossEntropy, "CHUNK_BYTES", 4 * 384 * rows)
    torch.manual_seed(0)
    z = 1e-2
    logits = (3 * torch.randn(3, 20, 384) + 5).requires_grad_()  # shifted: logsumexp far from 0
    labels = torch.randint(0, 384, (3, 20))
    labels[1, 3:9] = -100
    ref_logits = logits.detach().clone().requires_grad_()
    valid = labels.view(-1) != -100
    lse = torch.logsumexp(ref_logits.view(-1, 384), dim=-1)[valid]
    ref_ce = torch.nn.functional.cross_entropy(ref_logits.view(-1, 384), labels.view(-1), ignore_index=-100)
    ref_z = z * (lse ** 2).mean()
    ce, z_term = cross_entropy_and_z_fp32(logits, labels, z)
    torch.testing.assert_close((ce, z_term), (ref_ce, ref_z), rtol=1e-6, atol=1e-6)
    assert z_term > 0.1 * ce  # the penalty is not negligible here, so a wrong gradient shows
    (3 * ce + 2 * z_term).backward()
    (3 * ref_ce + 2 * ref_z).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_model_adds_z_loss_in_training_only():
    torch.manual_seed(0)
    model = CausalLM(tiny(z_loss=1e-3))
    tokens = torch.randint(0, 300, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = model(x).float()
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]), dim=-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss = model(x, labels=y)
    torch.testing.assert_close(loss, ce + 1e-3 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.last_z_loss, 1e-3 * (lse ** 2).mean(), rtol=1e-5, atol=1e-7)
    model.eval()
    torch.testing.assert_close(model(x, labels=y), ce, rtol=1e-5, atol=1e-6)
