"""Interchange with Hugging Face GPTNeoXForCausalLM: parity both ways (CPU fp32, tiny configs), at a length
longer than any used before, greedy generation, and the tokenizer."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import CausalLM, ModelConfig  # noqa: E402
from model.hf import hf_to_state_dict, load_hf, save_hf, state_dict_to_hf  # noqa: E402


def assert_logits_close(ours, theirs, rtol=1e-4):
    """Relative to the logits' scale: max |a - b| <= rtol * max |b|."""
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * theirs.abs().max().item(), (err, theirs.abs().max().item())


@pytest.mark.parametrize("overrides", [dict(), dict(use_parallel_residual=False, rotary_pct=0.5, num_layers=3)])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, overrides):
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300, **overrides)).eval()
    with torch.no_grad():
        ours(torch.randint(0, 300, (1, 64)))  # "trained" at 64: RoPE tables exist only up to 64
        save_hf(ours, tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(hf).__name__ == "GPTNeoXForCausalLM"
        x = torch.randint(0, 300, (2, 200))  # longer than any length used before
        assert_logits_close(ours(x), hf(x).logits)
    prompt = torch.randint(0, 300, (2, 5))
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=3, eos_token_id=None,
                           min_new_tokens=12)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), expected)


def test_import_random_transformers_model_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=192, rotary_pct=0.25, rotary_emb_base=5000,
                                     max_position_embeddings=64, use_parallel_residual=True)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorm to (1, 0) and biases to 0: perturb so the mapping is tested
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert (ours.config.padded_vocab_size, ours.config.intermediate_size, ours.config.rope_base) == (200, 192, 5000)
    x = torch.randint(0, 200, (2, 160))  # beyond max_position_embeddings
    with torch.no_grad():
        assert_logits_close(ours(x), hf(x).logits)
    prompt = torch.randint(0, 200, (1, 4))
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10), expected)


def test_state_dict_mapping_round_trips_and_matches_pythia_names():
    m = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300))
    hf_sd = state_dict_to_hf(m.state_dict(), m.config)
    assert "embed_out.weight" in hf_sd and "gpt_neox.layers.1.attention.query_key_value.bias" in hf_sd
    back = hf_to_state_dict({**hf_sd, "gpt_neox.layers.0.attention.masked_bias": torch.zeros(1)})
    assert back.keys() == m.state_dict().keys()


def test_linear_rope_scaling_exports_to_hf_rope_parameters(tmp_path):
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300, rope_scaling="linear",
                                           rope_scaling_factor=4.0)).eval()
    save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (1, 96))
    with torch.no_grad():
        assert_logits_close(ours(x), hf(x).logits)
    assert load_hf(tmp_path).config.rope_scaling == "linear"


def test_ntk_scaling_exports_as_a_larger_rope_theta(tmp_path):
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset("tiny", vocab_size=300, rope_scaling="ntk",
                                           rope_scaling_factor=2.0)).eval()
    save_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (1, 96))
    with torch.no_grad():
        assert_logits_close(ours(x), hf(x).logits)


def test_tokenizer_exported_with_the_model_encodes_like_sentencepiece(tmp_path, sp_model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    torch.manual_seed(0)
    save_hf(CausalLM(ModelConfig.from_preset("tiny", vocab_size=sp.vocab_size())), tmp_path, sp_model_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["the model grows its sequence length", "Pythia 1234 uses  two   spaces\tand tabs",
             " leading space and trailing ", "unseen chars: é ü 漢字 🙂 — byte fallback", "line\nbreak 42.", ""]
    for text in texts:
        assert tok(text)["input_ids"] == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 1, 3, 0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["vocab_size"]) == (2, 1, 384)


def test_load_hf_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found: pass a directory written by"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"model_type='mistral': only gpt_neox \(Pythia\) and llama checkpoints"):
        load_hf(tmp_path)


# ---------------------------------------------------------------- Llama
def random_llama(tmp_path, **config):
    """A randomly initialised transformers LlamaForCausalLM with GQA saved by save_pretrained; norm weights
    perturbed (HF inits them to 1) so that the mapping of every tensor is tested."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                                             max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6,
                                             tie_word_embeddings=False), **config})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=False, num_kv_heads=1, num_layers=3)])
def test_llama_export_loads_in_transformers_with_identical_logits(tmp_path, overrides):
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=300, **overrides)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        ours(torch.randint(0, 300, (1, 64)))  # "trained" at 64: RoPE tables exist only up to 64
        save_hf(ours, tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        assert hf.config.tie_word_embeddings == ours.config.tie_word_embeddings
        assert hf.config.num_key_value_heads == ours.config.num_kv_heads
        x = torch.randint(0, 300, (2, 300))  # longer than any length used before
        assert_logits_close(ours(x), hf(x).logits)
    prompt = torch.randint(0, 300, (2, 5))
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=3, eos_token_id=None,
                           min_new_tokens=12)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), expected)
    if ours.config.tie_word_embeddings:  # written once, as save_pretrained does
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


@pytest.mark.parametrize("config", [dict(), dict(tie_word_embeddings=True, num_key_value_heads=4)])
def test_import_random_transformers_llama_gives_identical_logits(tmp_path, config):
    hf = random_llama(tmp_path, **config)
    ours = load_hf(tmp_path).eval()
    c = ours.config
    assert (c.family, c.num_kv_heads, c.intermediate_size, c.rope_base, c.layer_norm_eps, c.padded_vocab_size) == \
        ("llama", config.get("num_key_value_heads", 2), 160, 5000.0, 1e-6, 200)
    assert c.tie_word_embeddings == config.get("tie_word_embeddings", False)
    x = torch.randint(0, 200, (2, 160))  # beyond max_position_embeddings
    with torch.no_grad():
        assert_logits_close(ours(x), hf(x).logits)
    prompt = torch.randint(0, 200, (1, 4))
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=10), expected)


def test_llama_round_trip_through_our_export_keeps_every_tensor(tmp_path):
    random_llama(tmp_path / "a")
    ours = load_hf(tmp_path / "a")
    save_hf(ours, tmp_path / "b")
    again = load_hf(tmp_path / "b")
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    mine = state_dict_to_hf(ours.state_dict(), ours.config)
    assert mine.keys() == theirs.keys()


@pytest.mark.parametrize("scaling, factor", [("linear", 4.0), ("ntk", 2.0)])
def test_llama_rope_scaling_exports_as_transformers_reads_it(tmp_path, scaling, factor):
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=300, rope_scaling=scaling,
                                           rope_scaling_factor=factor)).eval()
    save_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    if scaling == "linear":  # transformers 5 reads rope_parameters, transformers 4 rope_scaling + rope_theta
        assert written["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
        assert written["rope_scaling"] == written["rope_parameters"] and written["rope_theta"] == 10000.0
    else:  # static NTK = a larger base: 10000 * 2^(16/14)
        assert written["rope_scaling"] is None
        assert written["rope_theta"] == pytest.approx(10000.0 * 2.0 ** (16 / 14))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (1, 200))
    with torch.no_grad():
        assert_logits_close(ours(x), hf(x).logits)
    back = load_hf(tmp_path).config
    assert back.rope_scaling == ("linear" if scaling == "linear" else "none")
    # a transformers-4 style config (rope_scaling + rope_theta only) is read the same way, by both
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with torch.no_grad():
        assert_logits_close(load_hf(tmp_path)(x), hf(x).logits)
        assert_logits_close(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, hf(x).logits)


@pytest.mark.parametrize("change, match", [
    (dict(hidden_act="gelu"), r"differs from the Llama architecture this model implements \(hidden_act silu"),
    (dict(attention_bias=True), r"no attention or MLP bias"),
    (dict(head_dim=32), r"head_dim = hidden_size / num_attention_heads"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"rope type 'llama3' in config.json is not "
                                                                r"supported: only default and linear"),
])
def test_llama_configs_we_cannot_represent_are_refused(tmp_path, change, match):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, **change}))
    with pytest.raises(ValueError, match=match):
        load_hf(tmp_path)


def test_llama_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    random_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"\(config.json\): weights do not match a llama model of this config: wrong "
                                         r"shapes \['layers.0.self_attn.k_proj.weight \(32, 64\) \(expected "
                                         r"\(64, 64\)\)'"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"wrong shapes \[\], missing \['layers.2.input_layernorm.weight'"):
        load_hf(tmp_path)
