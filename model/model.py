"""The decoder both families share, single-device code, readable top to bottom.

    embed_in -> L x Block (the family's: model/gpt_neox.py or model/llama.py) -> final norm -> embed_out -> loss

Everything but the block and the norm is common: the RoPE tables (model/rope.py), the attention kernels
(model/attention.py, which the blocks call), activation checkpointing, init, the chunked fp32 loss, greedy
generation, parameter and FLOP counts. Top-level names are GPT-NeoX's (embed_in, final_layer_norm, embed_out)
for both families; model/hf.py maps them to each Hugging Face class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import gpt_neox, llama
from .attention import check_flash_requested, resolve_backend
from .config import ModelConfig
from .rope import RotaryCache

FAMILY_MODULES = {"gpt-neox": gpt_neox, "llama": llama}  # each defines Block, Norm and OUTPUT_PROJECTIONS


class CausalLM(nn.Module):
    """A RoPE causal LM of `config.family`. No block size: RoPE tables grow to whatever length is fed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_flash_requested(config.attention)
        self.config = config
        family = FAMILY_MODULES[config.family]
        d, V = config.hidden_size, config.padded_vocab_size
        self.embed_in = nn.Embedding(V, d)
        self.layers = nn.ModuleList(family.Block(config) for _ in range(config.num_layers))
        self.final_layer_norm = family.Norm(d, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(d, V, bias=False)
        if config.tie_word_embeddings:  # one Parameter in both places (SmolLM2); Pythia's are untied
            self.embed_out.weight = self.embed_in.weight
        self.rotary = RotaryCache(config.rotary_dim, config.rope_base, config.rope_scaling,
                                  config.rope_scaling_factor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal init N(0, init_std) for embeddings, input projections and the LM head; N(0, output_init_std)
        for the two projections per block that write into the residual stream; zero biases; norm weight 1, bias 0.
        The stds are the family's (Pythia's small_init / wang_init, or Llama's 0.02 / 0.02 / sqrt(2L))."""
        std, out_std = self.config.effective_init_std, self.config.effective_output_init_std
        outputs = FAMILY_MODULES[self.config.family].OUTPUT_PROJECTIONS
        for name, p in self.named_parameters():  # a tied head is listed once, as embed_in.weight
            if "layernorm" in name or "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(outputs):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def load_weights(self, sd: dict[str, torch.Tensor], source: str) -> None:
        """Load a full state dict of this architecture. A tied LM head stored only as the embedding (as
        save_pretrained writes it) is complete. Raises ValueError naming `source` and the keys that do not fit."""
        own = self.state_dict()
        shapes = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
        missing = [k for k in own if k not in sd and not (k == "embed_out.weight" and self.config.tie_word_embeddings)]
        unexpected = [k for k in sd if k not in own]
        if shapes or missing or unexpected:
            raise ValueError(f"{source}: weights do not match a {self.config.family} model of this config: "
                             f"wrong shapes {shapes[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(sd, strict=False)

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
        """Parameter count (a tied head counted once); exclude_embeddings drops the input embedding and an untied
        LM head, as Pythia's "non-embedding parameters" do."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_in.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.embed_out.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training matmul FLOPs per token at `seq_len` (forward + backward), PaLM's convention (Chowdhery
        et al. 2022, App. B):

            forward  = 2 * N_matmul + 4 * L * d * seq_len
            training = 3 * forward  = 6 * N_matmul + 12 * L * d * seq_len

        N_matmul = L * (2 d^2 + 2 d * kv + m * d * d_ff) + d * V_padded: the q and output projections (d x d),
        k and v (d x kv, kv = num_kv_heads * head_dim: d without GQA), the MLP's m matrices (2 for GELU, 3 for
        SwiGLU) and the LM head (tied or not, it is a matmul; the embedding lookup, biases and norms are not).
        The attention term counts QK^T and AV over all num_heads query heads (GQA shares k and v, not the work)
        for the full T x T score matrix (causal masking not discounted); it is what grows with the GrowLength
        stage. Activation checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).
        """
        c = self.config
        d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
        mlp_matrices = 3 if c.family == "llama" else 2
        n_matmul = c.num_layers * (2 * d * d + 2 * d * kv + mlp_matrices * d * c.intermediate_size) \
            + d * c.padded_vocab_size
        forward = 2 * n_matmul + 4 * c.num_layers * d * seq_len
        return 3.0 * forward


GPTNeoX = CausalLM  # the name before the Llama family existed; kept so that existing imports keep working


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
