"""The Llama block; the rest of the model (embedding, RoPE tables, final norm, head, loss) is the shared decoder
in model/model.py, and attention and RoPE are the same modules GPT-NeoX uses.

Block (pre-norm, sequential):   h = x + attn(rms1(x));  x = h + mlp(rms2(h))
Attention: separate q/k/v projections, k and v with num_kv_heads heads (grouped-query attention), RoPE on every
dim of each head (the same "rotate half" pairing as GPT-NeoX, which is also Hugging Face's Llama layout), causal
softmax attention, output projection. MLP (SwiGLU): down(silu(gate(x)) * up(x)). No biases anywhere.
Module names follow Hugging Face's LlamaForCausalLM inside a block (model/hf.py renames the rest).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Documents, causal_attention
from .config import ModelConfig
from .rope import apply_rotary

OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # write into the residual stream


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight multiplies (Hugging Face's
    LlamaRMSNorm order, so bf16 training rounds where theirs does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (..., d)."""
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


Norm = RMSNorm


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.deterministic = config.deterministic_attention
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                docs: Documents | None = None) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); docs: keep attention within these documents."""
        B, T, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)  # (B, T, nh, hd)
        k = apply_rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        y = causal_attention(q, k, v, backend, docs, self.deterministic)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, ff) inside


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = Norm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                docs: Documents | None = None) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); docs: keep attention within these documents."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, docs)
        return h + self.mlp(self.post_attention_layernorm(h))
