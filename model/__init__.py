"""Pythia-architecture (GPT-NeoX) RoPE decoder, single-device code."""
