"""The GPT-NeoX / Pythia block; the rest of the model (embedding, RoPE tables, final norm, head, loss) is the
shared decoder in model/model.py.

Block (parallel residual, Pythia):   x = x + attn(ln1(x)) + mlp(ln2(x))
Block (sequential):                  h = x + attn(ln1(x));  x = h + mlp(ln2(h))
Attention: fused qkv (per head [q | k | v], GPT-NeoX's layout), partial RoPE on the first rotary_dim dims of
q and k, causal softmax attention, output projection. MLP: Linear(d, 4d) -> exact GELU -> Linear(4d, d).
All linears have biases. Module names follow Hugging Face's GPTNeoXForCausalLM so that the weight mapping in
model/hf.py is a rename.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Documents, causal_attention
from .config import ModelConfig
from .rope import apply_rotary

Norm = nn.LayerNorm
OUTPUT_PROJECTIONS = ("attention.dense.weight", "dense_4h_to_h.weight")  # write into the residual stream


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                docs: Documents | None = None) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); docs: keep attention within these documents."""
        B, T, d = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)  # (B, T, nh, 3, hd)
        qk, v = qkv.split([2, 1], dim=3)  # split, not indexing: its backward is one cat, no zero-filled grads
        q, k = apply_rotary(qk, cos, sin).unbind(dim=3)  # each (B, T, nh, hd), strided views
        v = v.squeeze(3)  # (B, T, nh, hd)
        y = causal_attention(q, k, v, backend, docs)  # (B, T, nh, hd)
        return self.dense(y.reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = Norm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = Norm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                docs: Documents | None = None) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); docs: keep attention within these documents."""
        attn = self.attention(self.input_layernorm(x), cos, sin, backend, docs)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))
