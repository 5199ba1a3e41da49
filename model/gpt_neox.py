"""The GPT-NeoX / Pythia block; the rest of the model is the shared decoder in model/model.py.

Block (parallel residual, Pythia):   x = x + attn(ln1(x)) + mlp(ln2(x))
Block (sequential):                  h = x + attn(ln1(x));  x = h + mlp(ln2(h))
Attention: fused qkv (per head [q | k | v], GPT-NeoX's layout), partial RoPE on the first rotary_dim dims of q and
k, causal attention, output projection. MLP: Linear(d, 4d) -> exact GELU -> Linear(4d, d). All linears have
biases. Module names follow Hugging Face's GPTNeoXForCausalLM, so model/hf.py's weight mapping is a rename.
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
        self.deterministic = config.deterministic_attention
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                docs: Documents | None = None, add_bias: bool = True) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); docs: keep attention within these documents; without the output
        projection's bias when add_bias is False."""
        B, T, d = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)  # (B, T, nh, 3, hd)
        qk, v = qkv.split([2, 1], dim=3)  # split, not indexing: its backward is one cat, no zero-filled grads
        q, k = apply_rotary(qk, cos, sin).unbind(dim=3)  # each (B, T, nh, hd), strided views
        v = v.squeeze(3)  # (B, T, nh, hd)
        y = causal_attention(q, k, v, backend, docs, self.deterministic)  # (B, T, nh, hd)
        return F.linear(y.reshape(B, T, d), self.dense.weight, self.dense.bias if add_bias else None)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); without the output projection's bias when add_bias is False."""
        h = F.gelu(self.dense_h_to_4h(x))  # (B, T, 4d)
        return F.linear(h, self.dense_4h_to_h.weight, self.dense_4h_to_h.bias if add_bias else None)


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
        if self.use_parallel_residual:
            attn = self.attention(self.input_layernorm(x), cos, sin, backend, docs, add_bias=False)
            mlp = self.mlp(self.post_attention_layernorm(x), add_bias=False)
            # the two output biases as one sum: their gradients are then one reduction, not the same reduction
            # twice, which torch 2.13's CPU inductor emits as two C++ declarations of one name in bf16 (a build
            # error; see launcher/compile.py)
            return x + attn + mlp + (self.attention.dense.bias + self.mlp.dense_4h_to_h.bias)
        h = x + self.attention(self.input_layernorm(x), cos, sin, backend, docs)
        return h + self.mlp(self.post_attention_layernorm(h))
