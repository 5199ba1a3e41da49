"""RoPE decoders of two families, GPT-NeoX (Pythia) and Llama, over one attention and one RoPE module.

    from model import CausalLM, ModelConfig
    model = CausalLM(ModelConfig.from_preset("pythia-70m", vocab_size=sp.vocab_size()))      # gpt-neox
    model = CausalLM(ModelConfig.from_preset("smollm2-135m", vocab_size=sp.vocab_size()))    # llama

Hugging Face interchange (needs transformers) lives in `model.hf`: save_hf, load_hf (GPTNeoXForCausalLM and
LlamaForCausalLM).
"""
from .config import FAMILIES, PRESETS, ModelConfig

__all__ = ["CausalLM", "FAMILIES", "ModelConfig", "PRESETS"]


def __getattr__(name: str):
    """`CausalLM` on first use: `model.config` (the run config's `model:` section) stays importable without torch."""
    if name == "CausalLM":
        from .model import CausalLM
        return CausalLM
    raise AttributeError(f"module 'model' has no attribute {name!r}")
