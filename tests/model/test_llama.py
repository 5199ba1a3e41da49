"""The Llama family: presets against the published checkpoints' shapes and sizes, the block against references
written another way (RMSNorm, SwiGLU, grouped-query attention), FLOPs counted by torch, training. CPU fp32."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import CausalLM, ModelConfig, PRESETS

from model_checks import assert_checkpointing_changes_nothing


def tiny_llama(**overrides):
    return ModelConfig.from_preset("tiny-llama", vocab_size=300, **overrides)


# ---------------------------------------------------------------- presets and config
# (layers, d, heads, kv heads, d_ff, vocab, tied, rope_theta) from each model's published config.json, and its
# parameter count: SmolLM2-135M 134,515,008; SmolLM2-360M 361,821,120; TinyLlama-1.1B 1,100,048,384.
PUBLISHED = {
    "smollm2-135m": ((30, 576, 9, 3, 1536, 49152, True, 100000.0), 134_515_008, "135M"),
    "smollm2-360m": ((32, 960, 15, 5, 2560, 49152, True, 100000.0), 361_821_120, "362M"),
    "tinyllama-1.1b": ((22, 2048, 32, 4, 5632, 32000, False, 10000.0), 1_100_048_384, "1.1B"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_shapes_and_parameter_counts(name):
    shape, n_params, rounded = PUBLISHED[name]
    L, d, nh, nkv, ff, V, tied, theta = shape
    c = ModelConfig.from_preset(name, vocab_size=V)
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == \
        ("llama", L, d, nh, nkv, ff)
    assert (c.padded_vocab_size, c.tie_word_embeddings, c.rope_base, c.head_dim) == (V, tied, theta, 64)
    assert (c.rotary_dim, c.use_parallel_residual, c.layer_norm_eps) == (64, False, 1e-5)
    with torch.device("meta"):
        model = CausalLM(c)
    assert model.num_params() == n_params
    # the published size in the model's name / model card, at its rounding
    assert (f"{n_params / 1e6:.0f}M" if n_params < 1e9 else f"{n_params / 1e9:.1f}B") == rounded
    # and the same count from the shapes alone: per layer q, o (d x d), k, v (d x kv), 3 MLP matrices, 2 norms
    kv = nkv * d // nh
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    assert n_params == L * per_layer + d + V * d * (1 if tied else 2)


def test_llama_default_width_follows_metas_rule():
    for d, ff in [(576, 1536), (960, 2560), (2048, 5632), (4096, 11008)]:  # 11008: Llama-2-7B
        assert ModelConfig(vocab_size=10, hidden_size=d, num_layers=1, num_heads=d // 64,
                           family="llama").intermediate_size == ff


def test_family_defaults_and_preset_implies_family():
    c = tiny_llama()
    assert (c.family, c.rotary_pct, c.use_parallel_residual, c.num_kv_heads) == ("llama", 1.0, False, 2)
    assert ModelConfig.from_preset("tiny", vocab_size=300).family == "gpt-neox"
    assert ModelConfig.from_preset("tiny-llama", vocab_size=300, family="llama").family == "llama"
    assert all(p["family"] in ("gpt-neox", "llama") for p in PRESETS.values())


@pytest.mark.parametrize("name, kwargs, match", [
    ("tiny-llama", dict(family="gpt-neox"), r"family='gpt-neox' disagrees with preset 'tiny-llama', a llama model: "
                                            r"drop the family setting .* or choose a gpt-neox preset: tiny, narrow-4x128, pythia"),
    ("tiny", dict(family="llama"), r"family='llama' disagrees with preset 'tiny', a gpt-neox model.*tiny-llama, "
                                   r"smollm2-135m"),
])
def test_family_that_disagrees_with_the_preset_is_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset(name, vocab_size=300, **kwargs)


@pytest.mark.parametrize("name, kwargs, match", [
    ("tiny-llama", dict(num_kv_heads=3), r"num_kv_heads=3 does not divide num_heads=4: .*choose a divisor"),
    ("tiny-llama", dict(rotary_pct=0.25), r"rotary_pct=0.25: family llama rotates every dim"),
    ("tiny-llama", dict(use_parallel_residual=True), r"use_parallel_residual=True: family llama is sequential"),
    ("tiny", dict(num_kv_heads=2), r"num_kv_heads=2: family gpt-neox has no grouped-query attention"),
    ("tiny", dict(tie_word_embeddings=True), r"tie_word_embeddings=True: family gpt-neox \(Pythia\) keeps"),
    ("tiny-llama", dict(num_kv_heads=0), r"num_kv_heads=0: must be >= 1"),
])
def test_bad_llama_and_family_configs_say_what_to_change(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset(name, vocab_size=300, **kwargs)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match=r"family='mamba': choose one of gpt-neox, llama"):
        ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, family="mamba")


# ---------------------------------------------------------------- the block against references
def reference_llama_forward(model, input_ids):
    """Llama written out with explicit ops: RMSNorm as x * rsqrt(mean(x^2) + eps) * w, RoPE as complex
    multiplication over (i, i + hd/2) pairs, k and v repeated per group, masked softmax, SwiGLU."""
    c = model.config
    nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.layer_norm_eps) * w

    def rope(x):  # (B, T, h, hd)
        T = x.shape[1]
        freqs = c.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
        z = torch.complex(x[..., :hd // 2].double(), x[..., hd // 2:].double()) * torch.polar(
            torch.ones_like(angle), angle)[:, None]
        return torch.cat([z.real, z.imag], dim=-1).float()

    B, T = input_ids.shape
    x = model.embed_in.weight[input_ids]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q = rope((h @ a.q_proj.weight.T).view(B, T, nh, hd))
        k = rope((h @ a.k_proj.weight.T).view(B, T, nkv, hd)).repeat_interleave(nh // nkv, dim=2)
        v = (h @ a.v_proj.weight.T).view(B, T, nkv, hd).repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, nh * hd) @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.final_layer_norm.weight) @ model.embed_out.weight.T


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, tie_word_embeddings=False),
                                       dict(num_kv_heads=4, rope_base=500.0)])
def test_forward_matches_an_explicit_reference(overrides):
    torch.manual_seed(0)
    m = CausalLM(tiny_llama(**overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():  # norm weights are 1 at init: perturb them so their use is tested
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randint(0, 300, (2, 40))
        torch.testing.assert_close(m(x), reference_llama_forward(m, x), rtol=1e-4, atol=1e-4)


def test_llama_has_no_biases_tied_head_and_gqa_shapes():
    m = CausalLM(tiny_llama())
    assert not [n for n, _ in m.named_parameters() if n.endswith("bias")]
    assert m.embed_out.weight is m.embed_in.weight
    assert m.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # num_kv_heads * head_dim
    untied = CausalLM(tiny_llama(tie_word_embeddings=False))
    assert untied.embed_out.weight is not untied.embed_in.weight
    assert untied.num_params() - m.num_params() == 384 * 64
    assert m.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)


def test_llama_init_stds():
    torch.manual_seed(0)
    m = CausalLM(ModelConfig.from_preset("smollm2-135m", vocab_size=49152, num_layers=2))
    assert m.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.embed_in.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.layers[1].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.02)
    assert m.layers[1].self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.02)
    assert m.final_layer_norm.weight.min().item() == m.layers[0].input_layernorm.weight.max().item() == 1.0


# ---------------------------------------------------------------- counting
@pytest.mark.parametrize("preset, overrides", [("tiny-llama", dict()), ("tiny-llama", dict(num_kv_heads=1)),
                                               ("tiny", dict()), ("tiny", dict(use_parallel_residual=False))])
def test_flops_per_token_equals_torchs_count_of_a_training_step(preset, overrides):
    """torch's FlopCounterMode counts every matmul of a real forward + backward (SDPA's math kernel, so the
    attention matmuls are counted too, over all query heads and the full T x T)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = CausalLM(ModelConfig.from_preset(preset, vocab_size=300, attention="sdpa", **overrides))
    B, T = 2, 48
    x = torch.randint(0, 300, (B, T + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(x[:, :-1], labels=x[:, 1:]).backward()
    assert counter.get_total_flops() == m.flops_per_token(T) * B * T


def test_flops_per_token_from_the_parameter_shapes():
    with torch.device("meta"):
        m = CausalLM(ModelConfig.from_preset("smollm2-135m", vocab_size=49152, num_layers=3))
    # every 2-D weight but the embedding lookup is a matmul; the tied head is one again, at d x V
    n_matmul = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n != "embed_in.weight")
    n_matmul += m.embed_out.weight.numel()
    assert m.flops_per_token(2048) == 6 * n_matmul + 12 * 3 * 576 * 2048


# ---------------------------------------------------------------- training
def test_llama_overfits_one_batch_and_checkpointing_gives_identical_grads():
    torch.manual_seed(0)
    a = CausalLM(tiny_llama())
    b = CausalLM(tiny_llama(activation_checkpointing=True))
    assert_checkpointing_changes_nothing(a, b)
    x = torch.randint(0, 300, (4, 33))
    opt = torch.optim.AdamW(a.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = a(x[:, :-1], labels=x[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 5.0 and losses[-1] < 0.1, (losses[0], losses[-1])


def test_bf16_llama_keeps_fp32_loss_and_rope_tables():
    torch.manual_seed(0)
    m = CausalLM(tiny_llama()).to(torch.bfloat16)
    x = torch.randint(0, 300, (2, 16))
    assert m(x).dtype == torch.bfloat16
    loss = m(x, labels=x)
    assert loss.dtype == torch.float32 and m.rotary.cos.dtype == torch.float32
    loss.backward()
    assert m.embed_in.weight.grad.dtype == torch.bfloat16
