"""Interchange with Hugging Face GPTNeoXForCausalLM: parity both ways (CPU fp32, tiny configs), at a length
longer than any used before, greedy generation, and the tokenizer."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import GPTNeoX, ModelConfig  # noqa: E402
from model.hf import hf_to_state_dict, load_hf, save_hf, state_dict_to_hf  # noqa: E402


def assert_logits_close(ours, theirs, rtol=1e-4):
    """Relative to the logits' scale: max |a - b| <= rtol * max |b|."""
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * theirs.abs().max().item(), (err, theirs.abs().max().item())


@pytest.mark.parametrize("overrides", [dict(), dict(use_parallel_residual=False, rotary_pct=0.5, num_layers=3)])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, overrides):
    torch.manual_seed(0)
    ours = GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=300, **overrides)).eval()
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
    m = GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=300))
    hf_sd = state_dict_to_hf(m.state_dict(), m.config)
    assert "embed_out.weight" in hf_sd and "gpt_neox.layers.1.attention.query_key_value.bias" in hf_sd
    back = hf_to_state_dict({**hf_sd, "gpt_neox.layers.0.attention.masked_bias": torch.zeros(1)})
    assert back.keys() == m.state_dict().keys()


def test_linear_rope_scaling_exports_to_hf_rope_parameters(tmp_path):
    torch.manual_seed(0)
    ours = GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=300, rope_scaling="linear",
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
    ours = GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=300, rope_scaling="ntk",
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
    save_hf(GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=sp.vocab_size())), tmp_path, sp_model_path)
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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type='llama': only gpt_neox \(Pythia\) checkpoints"):
        load_hf(tmp_path)
