"""Pythia-architecture (GPT-NeoX) RoPE decoder, single-device code.

    from model import GPTNeoX, ModelConfig
    model = GPTNeoX(ModelConfig.from_preset("pythia-70m", vocab_size=sp.vocab_size()))

Hugging Face interchange (needs transformers) lives in `model.hf`: save_hf, load_hf.
"""
from .config import PRESETS, ModelConfig
from .model import GPTNeoX

__all__ = ["GPTNeoX", "ModelConfig", "PRESETS"]
