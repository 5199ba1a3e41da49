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
from .attention import KERNELS, Documents, check_flash_requested, documents, resolve_backend
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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, T) long. Returns logits (B, T, padded_vocab_size) in the model's dtype when labels
        is None; else the mean cross-entropy over labels != -100 as an fp32 scalar. labels: (B, T) long,
        already shifted (labels[:, t] is the token that should follow input_ids[:, t]).

        cu_seqlens: (n + 1,) integer document starts over the B * T flattened tokens, then B * T, every row start
        included (flash-attn's varlen layout; best on the CPU, see model.attention.documents): attention then
        never crosses a document, and with config.reset_position_ids RoPE positions restart at each one. None:
        each row is one causal sequence."""
        x = self.blocks(self.embed_in(input_ids), cu_seqlens)  # (B, T, d)
        logits = self.embed_out(self.final_layer_norm(x))  # (B, T, V)
        if labels is None:
            return logits
        if not (self.training and self.config.z_loss):
            return cross_entropy_fp32(logits, labels)
        ce, z_term = cross_entropy_and_z_fp32(logits, labels, self.config.z_loss)
        self.last_z_loss = z_term.detach()  # logged apart from the cross-entropy by the trainer
        return ce + z_term

    def blocks(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder stack on embeddings, x: (B, T, d) -> (B, T, d): the attention kernel, the documents of
        `cu_seqlens` (see forward), the RoPE tables, then every block (recomputed in backward with
        activation_checkpointing). The one copy of this loop: launcher/compile.py's warm-up calls it too, so the
        graph it builds is the one training runs."""
        B, T, _ = x.shape
        backend = resolve_backend(self.config.attention, x.device, x.dtype, cu_seqlens is not None,
                                  self.config.deterministic_attention)
        docs = None if cu_seqlens is None else documents(cu_seqlens, B, T, x.device, backend)
        cos, sin = self.rotary_tables(T, x.device, docs)
        for layer in self.layers:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, backend, docs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, backend, docs)
        return x

    def rotary_tables(self, seq_len: int, device: torch.device,
                      docs: Documents | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin fp32: (T, r/2) for positions 0..T-1, or (B, T, r/2) at each token's position within its
        document when config.reset_position_ids and `docs` are given."""
        cos, sin = self.rotary.get(seq_len, device)  # (T, r/2) each
        if docs is not None and self.config.reset_position_ids:
            return cos[docs.positions], sin[docs.positions]  # (B, T, r/2)
        return cos, sin

    def attention_kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        """The attention kernel a training forward on `device` in `dtype` uses (for the stage log line)."""
        masked = self.config.document_masking
        kernel = KERNELS[resolve_backend(self.config.attention, device, dtype, masked,
                                         self.config.deterministic_attention), masked]
        return kernel + (", positions reset per document" if self.config.reset_position_ids else "")

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

    def matmul_flops_per_token(self) -> float:
        """Training FLOPs per token of every matmul but attention's scores: 6 * N_matmul (see flops_per_token)."""
        c = self.config
        d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
        mlp_matrices = 3 if c.family == "llama" else 2
        n_matmul = c.num_layers * (2 * d * d + 2 * d * kv + mlp_matrices * d * c.intermediate_size) \
            + d * c.padded_vocab_size
        return 6.0 * n_matmul

    def attention_flops(self, pairs: int) -> float:
        """Training FLOPs (forward + backward) of QK^T and AV over `pairs` (query, key) pairs, per layer and query
        head: 2 matmuls x 2 FLOPs x head_dim forward, 3x for training: 12 * L * num_heads * head_dim * pairs."""
        c = self.config
        return 12.0 * c.num_layers * c.num_heads * c.head_dim * pairs

    def flops_per_token(self, seq_len: int) -> float:
        """Training matmul FLOPs per token at `seq_len` (forward + backward), PaLM's convention (Chowdhery
        et al. 2022, App. B):

            forward  = 2 * N_matmul + 4 * L * d * seq_len
            training = 3 * forward  = 6 * N_matmul + 12 * L * d * seq_len

        N_matmul = L * (2 d^2 + 2 d * kv + m * d * d_ff) + d * V_padded: the q and output projections (d x d),
        k and v (d x kv, kv = num_kv_heads * head_dim: d without GQA), the MLP's m matrices (2 for GELU, 3 for
        SwiGLU) and the LM head (tied or not, it is a matmul; the embedding lookup, biases and norms are not).
        The attention term counts QK^T and AV over all num_heads query heads (GQA shares k and v, not the work)
        for the full T x T score matrix (causal masking not discounted): attention_flops(T * T) / T. What a step
        really computes is matmul_flops_per_token() * tokens + attention_flops(model.attention.attention_pairs(...)),
        about half of that attention term when causal, less again within documents. Activation checkpointing's
        recomputation is not counted (model FLOPs, not hardware FLOPs).
        """
        return self.matmul_flops_per_token() + self.attention_flops(seq_len * seq_len) / seq_len


@torch.no_grad()
def mean_loss(forward, batches, device: torch.device) -> tuple[float, int]:
    """The one validation loop: summed next-token loss over ``batches`` of ``(tokens (B, L + 1) int64, cu_seqlens
    or None)`` and the number of labels, ``(loss_sum, n_labels)`` (the mean is their ratio; ranks add both first).
    ``forward``: the model, or the DeepSpeed engine wrapping it."""
    loss_sum, n = 0.0, 0
    for tokens, cu_seqlens in batches:
        tokens = tokens.to(device)  # (B, L + 1)
        loss = forward(tokens[:, :-1], labels=tokens[:, 1:], cu_seqlens=cu_seqlens)
        loss_sum += loss.item() * tokens[:, 1:].numel()
        n += tokens[:, 1:].numel()
    return loss_sum, n


def cross_entropy_fp32(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100, in fp32 whatever the logits' dtype.

    logits (B, T, V), labels (B, T) -> () fp32. Computed in row chunks so that no fp32 copy of the whole
    (B*T, V) logits, nor of their gradient, is ever materialised (1.6 GB for Pythia's vocabulary at 8k tokens).
    """
    return cross_entropy_and_z_fp32(logits, labels, 0.0)[0]


def cross_entropy_and_z_fp32(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, ...]:
    """``(cross-entropy, z_loss * mean(logsumexp(logits)^2))`` over labels != -100, both () fp32, chunked as
    :func:`cross_entropy_fp32`; the second is the log-partition penalty of PaLM and OLMo (it keeps the softmax
    normaliser near 1, so the logits do not drift in bf16)."""
    V = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, V), labels.reshape(-1), z_loss)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """ce = mean_i (lse_i - z_i[y_i]), zl = c * mean_i lse_i^2 with lse_i = logsumexp(z_i);
    dce/dz_i = (softmax(z_i) - onehot(y_i)) / n_valid and dzl/dz_i = 2 c lse_i softmax(z_i) / n_valid, with the
    softmax recomputed per chunk in backward instead of saved."""

    # fp32 (rows, V) working set per chunk: 5,336 rows at Pythia's padded 50,304 vocabulary, 32,768 at 8,192, so a
    # 32k-token micro-batch is a handful of chunks (a few large kernels), not hundreds of small ones
    CHUNK_BYTES = 1 << 30

    @staticmethod
    def rows_per_chunk(vocab: int) -> int:
        return max(1, _ChunkedCrossEntropy.CHUNK_BYTES // (4 * vocab))

    @staticmethod
    def forward(ctx, logits, labels, z_loss):  # logits (N, V) any float dtype, labels (N,) long, z_loss float
        N, V = logits.shape
        rows = _ChunkedCrossEntropy.rows_per_chunk(V)
        valid = labels != -100
        safe_labels = torch.where(valid, labels, 0)[:, None]  # (N, 1)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # log-partition per row
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)  # -log p(label) per row
        for s in range(0, N, rows):
            chunk = logits[s:s + rows].float()  # (rows, V) fp32
            lse[s:s + rows] = torch.logsumexp(chunk, dim=-1)
            nll[s:s + rows] = lse[s:s + rows] - chunk.gather(1, safe_labels[s:s + rows]).squeeze(1)
        n_valid = valid.sum()
        ctx.save_for_backward(logits, safe_labels, valid, n_valid, lse)
        ctx.rows, ctx.z_loss = rows, z_loss
        ce = (nll * valid).sum() / n_valid  # nan when no label is valid, as F.cross_entropy
        return ce, z_loss * (lse.square() * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        logits, safe_labels, valid, n_valid, lse = ctx.saved_tensors
        scale = valid.float() / n_valid  # (N,)
        onehot_scale = (scale * grad_ce)[:, None]  # (N, 1)
        softmax_scale = (scale * (grad_ce + 2 * ctx.z_loss * lse * grad_z))[:, None]  # (N, 1)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.rows):
            p = torch.softmax(logits[s:s + ctx.rows], dim=-1, dtype=torch.float32)  # recomputed, (rows, V)
            p.mul_(softmax_scale[s:s + ctx.rows])
            p.scatter_add_(1, safe_labels[s:s + ctx.rows], -onehot_scale[s:s + ctx.rows])  # - onehot
            grad[s:s + ctx.rows] = p
        return grad, None, None
