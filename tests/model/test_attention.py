"""RoPE against a complex-number reference, SDPA against naive attention, and the flash-attn glue driven by a
stand-in module with flash-attn's exact signature and layout."""
import logging
import math
import sys
import types

import pytest
import torch

from model import CausalLM, ModelConfig
from model import attention as attention_mod
from model.attention import causal_attention
from model.rope import RotaryCache, apply_rotary, inv_frequencies


# ---------------------------------------------------------------- RoPE
def complex_rope_reference(x, rotary_dim, base, position_scale=1.0):
    """GPT-NeoX RoPE written as complex multiplication: pair (i, i + r/2) of the rotary slice is the complex
    number x_i + j x_{i+r/2}, multiplied by exp(j * pos * base^(-2i/r)). x: (B, T, nh, hd) float64."""
    half = rotary_dim // 2
    T = x.shape[1]
    freqs = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # (r/2,)
    angle = (torch.arange(T, dtype=torch.float64) * position_scale)[:, None] * freqs  # (T, r/2)
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("rotary_dim, head_dim", [(16, 64), (8, 8)])
def test_rope_matches_complex_rotation_reference(rotary_dim, head_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 200, 3, head_dim, dtype=torch.float64)
    cos, sin = RotaryCache(rotary_dim, 10000.0).get(200, torch.device("cpu"))
    ours = apply_rotary(x.float(), cos, sin).double()
    torch.testing.assert_close(ours, complex_rope_reference(x, rotary_dim, 10000.0), rtol=1e-5, atol=1e-4)
    # relative position property: <rope(q)_m, rope(k)_n> depends on m - n only
    q = torch.randn(1, 1, 1, head_dim).expand(1, 200, 1, head_dim)
    rq = apply_rotary(q, cos, sin)[0, :, 0]
    torch.testing.assert_close(rq[10] @ rq[3], rq[107] @ rq[100], rtol=1e-4, atol=1e-4)


def test_rope_cache_at_128_equals_first_rows_of_cache_at_512():
    small = RotaryCache(16, 10000.0)
    c128, s128 = small.get(128, torch.device("cpu"))
    c128, s128 = c128.clone(), s128.clone()
    c512, s512 = RotaryCache(16, 10000.0).get(512, torch.device("cpu"))
    assert c128.dtype == torch.float32 and c512.shape == (512, 8)
    assert torch.equal(c128, c512[:128]) and torch.equal(s128, s512[:128])
    # growing the same cache on demand keeps it consistent
    c_grown, _ = small.get(512, torch.device("cpu"))
    assert torch.equal(c_grown, c512)


def test_linear_interpolation_divides_positions_and_ntk_raises_base():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 2, 16, dtype=torch.float64)
    cos, sin = RotaryCache(16, 10000.0, "linear", 4.0).get(64, torch.device("cpu"))
    ref = complex_rope_reference(x, 16, 10000.0, position_scale=0.25)
    torch.testing.assert_close(apply_rotary(x.float(), cos, sin).double(), ref, rtol=1e-5, atol=1e-5)
    ntk = inv_frequencies(16, 10000.0, "ntk", 4.0)
    torch.testing.assert_close(ntk, inv_frequencies(16, 10000.0 * 4.0 ** (16 / 14)))
    assert ntk[0] == 1.0  # highest frequency untouched
    torch.testing.assert_close(ntk[-1], inv_frequencies(16, 10000.0)[-1] / 4.0)  # lowest one interpolated x4


# ---------------------------------------------------------------- attention
def naive_causal_attention(q, k, v):
    """q, k, v: (B, T, nh, hd) -> (B, T, nh, hd), explicit masked softmax."""
    T, hd = q.shape[1], q.shape[-1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def test_sdpa_matches_naive_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 4, 16) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), naive_causal_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


def stand_in_flash_attn(calls):
    """A module with flash-attn 2's exact `flash_attn_func` signature and (B, T, nh, hd) layout."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert causal and dropout_p == 0.0 and softmax_scale is None
        assert q.dim() == 4 and q.shape == k.shape == v.shape
        calls.append(tuple(q.shape))
        return naive_causal_attention(q, k, v)
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, __name__="flash_attn")


def test_flash_glue_with_stand_in_gives_sdpa_logits_and_grads(monkeypatch, caplog):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn(calls))
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)  # let the real glue run on CPU fp32
    monkeypatch.setattr(attention_mod, "_logged", set())
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=300)
    sdpa = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300, attention="sdpa"))
    flash = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300, attention="flash"))
    auto = CausalLM(cfg)
    flash.load_state_dict(sdpa.state_dict())
    auto.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 300, (2, 50))
    with caplog.at_level(logging.INFO, logger="model.attention"):
        ref, out, out_auto = sdpa(x, labels=x), flash(x, labels=x), auto(x, labels=x)
        flash(x)
    assert calls == [(2, 50, 4, 16)] * 6  # 2 layers x (flash, auto, flash)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_auto, ref, rtol=1e-5, atol=1e-5)
    ref.backward()
    out.backward()
    torch.testing.assert_close(flash.layers[0].attention.query_key_value.weight.grad,
                               sdpa.layers[0].attention.query_key_value.weight.grad, rtol=1e-4, atol=1e-6)
    chosen = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(chosen) == 3 and sum("backend: flash" in m for m in chosen) == 2  # each choice logged once
    assert "backend: sdpa" in chosen[0]


def test_auto_falls_back_to_sdpa_on_cpu_even_with_flash_installed(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn(calls))
    m = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300))
    m(torch.randint(0, 300, (1, 8)))
    assert calls == []  # CPU tensors: flash-attn cannot run there, SDPA is used


def test_flash_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    cfg = ModelConfig.from_preset("tiny", vocab_size=300, attention="flash")
    reason = "no CUDA device is available" if not torch.cuda.is_available() else "flash-attn package is not"
    with pytest.raises(RuntimeError, match=rf"attention='flash' was requested but {reason}.*set attention='sdpa'"):
        CausalLM(cfg)


def test_flash_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn([]))
    with pytest.raises(RuntimeError, match=r"tensors are on cpu, flash-attn 2 needs CUDA; set attention='sdpa'"):
        attention_mod.resolve_backend("flash", torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(RuntimeError, match=r"flash-attn package is not installed \(see docs/gpu.md: Installing "
                                           r"flash-attn\)"):
        attention_mod.resolve_backend("flash", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- grouped-query attention (Llama)
@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_sdpa_gqa_matches_naive_attention_on_repeated_kv_heads(nkv):
    torch.manual_seed(0)
    q = torch.randn(2, 37, 4, 16)
    k, v = torch.randn(2, 37, nkv, 16), torch.randn(2, 37, nkv, 16)
    # query head h reads kv head h // (nh / nkv): kv head j repeated nh / nkv times in place
    ref = naive_causal_attention(q, k.repeat_interleave(4 // nkv, dim=2), v.repeat_interleave(4 // nkv, dim=2))
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), ref, rtol=1e-5, atol=1e-5)


def stand_in_gqa_flash_attn(calls):
    """flash-attn 2's documented GQA: k, v may have fewer heads than q, a divisor of them."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        assert causal and q.shape[2] % k.shape[2] == 0 and k.shape == v.shape
        calls.append((q.shape[2], k.shape[2]))
        g = q.shape[2] // k.shape[2]
        return naive_causal_attention(q, k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2))
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, __name__="flash_attn")


def test_llama_flash_glue_passes_shared_kv_heads_and_matches_sdpa(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_gqa_flash_attn(calls))
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)
    torch.manual_seed(0)
    sdpa = CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=300, attention="sdpa"))
    flash = CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=300, attention="flash"))
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 300, (2, 50))
    ref, out = sdpa(x, labels=x), flash(x, labels=x)
    assert calls == [(4, 2)] * 2  # k and v reach the kernel with their 2 heads, not repeated to 4
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.backward()
    out.backward()
    torch.testing.assert_close(flash.layers[0].self_attn.k_proj.weight.grad,
                               sdpa.layers[0].self_attn.k_proj.weight.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- where flash-attn can run
def test_auto_takes_sdpa_below_compute_capability_8_and_flash_errors(monkeypatch, caplog):
    """The capability is injected at its boundary (attention._cuda_capability, what torch.cuda reports); the
    stand-in flash-attn is installed, so only the capability decides."""
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn([]))
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)
    monkeypatch.setattr(attention_mod, "_logged", set())
    monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (7, 0))  # V100
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="model.attention"):
        assert attention_mod.resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert "compute capability 7.0 and flash-attn 2 needs 8.0 or newer" in caplog.text
    with pytest.raises(RuntimeError, match=r"attention='flash' was requested but the GPU has compute capability 7.5 "
                                           r"and flash-attn 2 needs 8.0 or newer .*; set attention='sdpa'"):
        monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (7, 5))  # T4
        attention_mod.check_flash_requested("flash")
    for capability in [(8, 0), (8, 9)]:  # A100, L40S
        monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device, c=capability: c)
        assert attention_mod.resolve_backend("auto", cpu, torch.float32) == "flash"
    # Hopper and newer: SDPA (cuDNN) without documents, flash-attn for documents and for deterministic attention
    for capability in [(9, 0), (10, 0)]:  # H100/H200, B200
        monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device, c=capability: c)
        with caplog.at_level(logging.INFO, logger="model.attention"):
            assert attention_mod.resolve_backend("auto", cpu, torch.float32) == "sdpa"
        assert f"sm{capability[0]}{capability[1]}: SDPA (cuDNN attention on Hopper)" in caplog.text
        assert attention_mod.resolve_backend("auto", cpu, torch.float32, masked=True) == "flash"
        assert attention_mod.resolve_backend("auto", cpu, torch.float32, deterministic=True) == "flash"
        assert attention_mod.resolve_backend("flash", cpu, torch.float32) == "flash"


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    """A real `flash_attn` package on sys.path whose import fails the way a build for another torch does."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        'raise ImportError("/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: '
        '_ZN3c104cuda9SetDeviceEi")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)
    monkeypatch.setattr(attention_mod, "_logged", set())


def test_broken_flash_attn_build_is_reported_with_its_import_error(broken_flash_attn, caplog):
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"attention='flash' was requested but flash-attn is installed but does "
                                           r"not import \(ImportError: .*undefined symbol: _ZN3c104cuda9SetDeviceEi\); "
                                           r"rebuild it"):
        attention_mod.resolve_backend("flash", cpu, torch.float32)
    with caplog.at_level(logging.INFO, logger="model.attention"):
        assert attention_mod.resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert "undefined symbol" in caplog.text and "not installed" not in caplog.text


def test_missing_extension_module_is_not_called_not_installed(tmp_path, monkeypatch):
    """flash_attn imports, but the compiled module it needs is absent: a ModuleNotFoundError of another name."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("import flash_attn_2_cuda_missing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)
    reason = attention_mod.flash_unusable_reason(torch.device("cpu"), torch.float32)
    assert reason.startswith("flash-attn is installed but does not import (ModuleNotFoundError: No module named "
                             "'flash_attn_2_cuda_missing_here')")
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__="1.0.9", __name__="flash_attn"))
    attention_mod.forget_flash()  # resolved once per process: a new module needs a new look
    assert attention_mod.flash_unusable_reason(torch.device("cpu"), torch.float32) == \
        "flash_attn 1.0.9 has no flash_attn_func (flash-attn 2 is needed)"
