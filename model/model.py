"""GPT-NeoX / Pythia decoder, single-device code, readable top to bottom.

Block (parallel residual, Pythia):   x = x + attn(ln1(x)) + mlp(ln2(x))
Block (sequential):                  h = x + attn(ln1(x));  x = h + mlp(ln2(h))
Attention: fused qkv (per head [q | k | v], GPT-NeoX's layout), partial RoPE on the first rotary_dim dims of
q and k, causal softmax attention, output projection. MLP: Linear(d, 4d) -> exact GELU -> Linear(4d, d).
All linears have biases, except the untied LM head. Module names follow Hugging Face's GPTNeoXForCausalLM so
that the weight mapping in model/hf.py is a rename.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import causal_attention, check_flash_requested, resolve_backend
from .config import ModelConfig
from .rope import RotaryCache, apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        B, T, d = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)  # (B, T, nh, 3, hd)
        qk, v = qkv.split([2, 1], dim=3)  # split, not indexing: its backward is one cat, no zero-filled grads
        q, k = apply_rotary(qk, cos, sin).unbind(dim=3)  # each (B, T, nh, hd), strided views
        v = v.squeeze(3)  # (B, T, nh, hd)
        y = causal_attention(q, k, v, backend)  # (B, T, nh, hd)
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
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        attn = self.attention(self.input_layernorm(x), cos, sin, backend)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoX(nn.Module):
    """Pythia-architecture causal LM. No block size: RoPE tables grow to whatever length is fed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_flash_requested(config.attention)
        self.config = config
        d, V = config.hidden_size, config.padded_vocab_size
        self.embed_in = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(d, V, bias=False)  # untied from embed_in, as in Pythia
        self.rotary = RotaryCache(config.rotary_dim, config.rope_base, config.rope_scaling,
                                  config.rope_scaling_factor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Pythia's init: small_init N(0, sqrt(2/(5d))) for embeddings, qkv, MLP-in and the LM head;
        wang_init N(0, 2/(L*sqrt(d))) for the two projections that write into the residual stream;
        zero biases; LayerNorm weight 1, bias 0."""
        std, out_std = self.config.effective_init_std, self.config.effective_output_init_std
        for name, p in self.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) long. Returns logits (B, T, padded_vocab_size) in the model's dtype when labels
        is None; else the mean cross-entropy over labels != -100 as an fp32 scalar. labels: (B, T) long,
        already shifted (labels[:, t] is the token that should follow input_ids[:, t])."""
        B, T = input_ids.shape
        x = self.embed_in(input_ids)  # (B, T, d)
        cos, sin = self.rotary.get(T, x.device)  # (T, r/2) fp32 each
        backend = resolve_backend(self.config.attention, x.device, x.dtype)
        for layer in self.layers:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, backend, use_reentrant=False)
            else:
                x = layer(x, cos, sin, backend)
        logits = self.embed_out(self.final_layer_norm(x))  # (B, T, V)
        if labels is None:
            return logits
        return cross_entropy_fp32(logits, labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding (no KV cache; for tests and quick looks). input_ids: (B, T) -> (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            next_id = self(input_ids)[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input embedding and the (untied) LM head, as Pythia's
        "non-embedding parameters" do."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_in.weight.numel() + self.embed_out.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training matmul FLOPs per token at `seq_len` (forward + backward), PaLM's convention (Chowdhery
        et al. 2022, App. B):

            forward  = 2 * N_matmul + 4 * L * d * seq_len
            training = 3 * forward  = 6 * N_matmul + 12 * L * d * seq_len

        N_matmul = L * (4 d^2 + 2 d d_ff) + d * V_padded (qkv, attention out, MLP in/out, LM head; the
        embedding lookup, biases and norms do no matmul). The attention term counts QK^T and AV for the full
        T x T score matrix (causal masking not discounted) and is what grows with the GrowLength stage.
        Activation checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).
        """
        c = self.config
        n_matmul = c.num_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size) \
            + c.hidden_size * c.padded_vocab_size
        forward = 2 * n_matmul + 4 * c.num_layers * c.hidden_size * seq_len
        return 3.0 * forward


def cross_entropy_fp32(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100, in fp32 whatever the logits' dtype.

    logits (B, T, V), labels (B, T) -> () fp32. Computed in row chunks so that no fp32 copy of the whole
    (B*T, V) logits, nor of their gradient, is ever materialised (1.6 GB for Pythia's vocabulary at 8k tokens).
    """
    V = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, V), labels.reshape(-1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """loss = mean_i -log_softmax(z_i)[y_i];  dloss/dz_i = (softmax(z_i) - onehot(y_i)) / n_valid, with the
    softmax recomputed per chunk in backward instead of saved."""

    CHUNK_ELEMENTS = 1 << 24  # fp32 working set per chunk: 64 MB

    @staticmethod
    def forward(ctx, logits, labels):  # logits (N, V) any float dtype, labels (N,) long
        N, V = logits.shape
        rows = max(1, _ChunkedCrossEntropy.CHUNK_ELEMENTS // V)
        valid = labels != -100
        safe_labels = torch.where(valid, labels, 0)[:, None]  # (N, 1)
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)  # -log p(label) per row
        for s in range(0, N, rows):
            logp = F.log_softmax(logits[s:s + rows], dim=-1, dtype=torch.float32)  # (rows, V) fp32
            nll[s:s + rows] = -logp.gather(1, safe_labels[s:s + rows]).squeeze(1)
        n_valid = valid.sum()
        ctx.save_for_backward(logits, safe_labels, valid, n_valid)
        ctx.rows = rows
        return (nll * valid).sum() / n_valid  # nan when no label is valid, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe_labels, valid, n_valid = ctx.saved_tensors
        row_scale = (valid.float() * (grad_loss / n_valid))[:, None]  # (N, 1)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.rows):
            p = torch.softmax(logits[s:s + ctx.rows], dim=-1, dtype=torch.float32)  # recomputed, (rows, V)
            p.scatter_add_(1, safe_labels[s:s + ctx.rows], torch.full_like(p[:, :1], -1.0))  # - onehot
            grad[s:s + ctx.rows] = p.mul_(row_scale[s:s + ctx.rows])
        return grad, None
