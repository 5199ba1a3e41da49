"""A CPU stand-in for flash-attn 2 that torch.compile sees the way it sees the real one.

flash-attn >= 2.6 registers its kernels as ``torch.library.custom_op``s (``flash_attn::_flash_attn_forward`` and
friends, CUDA only) behind ``flash_attn_func`` / ``flash_attn_varlen_func``. This module registers CPU custom ops
with the same public signatures and layouts, computed by a plain per-segment softmax, with a fake (meta) kernel and
an autograd formula, so dynamo captures them as opaque ops exactly as it does flash-attn's. The op checks flash-attn's
varlen contract on every call (``check_varlen_contract``) and records each call's shapes in ``CALLS``.

    install(monkeypatch)  # sys.modules["flash_attn"] = this stand-in; the glue's CUDA/fp16 gate lifted
"""
from __future__ import annotations

import math
import sys
import types

import torch

CALLS: list[tuple] = []  # ("varlen" | "dense", q shape, kv heads, cu_seqlens length, max_seqlen, deterministic)


def naive_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """q (N, nh, hd), k, v (N, nkv, hd): causal softmax attention inside each segment [cu[i], cu[i+1]); empty
    segments (repeated entries, the padding) produce nothing."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / math.sqrt(q.shape[-1])  # (nh, l, l)
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v[a:b])
    return out


def check_varlen_contract(q, k, v, cu_seqlens, max_seqlen: int) -> None:
    """flash-attn 2's varlen requirements (flash_api.cpp mha_varlen_fwd, and the kernel's per-segment bounds)."""
    assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and q.shape[1] % k.shape[1] == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device and cu_seqlens.is_contiguous()
    cu = cu_seqlens.long()
    assert cu[0] == 0 and cu[-1] == q.shape[0], "cu_seqlens must run from 0 to the total tokens"
    lengths = cu[1:] - cu[:-1]
    assert (lengths >= 0).all(), "cu_seqlens must not decrease (empty segments are allowed)"
    assert isinstance(max_seqlen, int) and max_seqlen >= int(lengths.max()), "max_seqlen bounds every segment"


def _segment_grads(grad, q, k, v, cu):
    """d(q, k, v) of naive_segment_attention by hand (a custom op's kernel runs below autograd)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kr), torch.zeros_like(vr)
    scale = 1 / math.sqrt(q.shape[-1])
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        p = (torch.einsum("qhd,khd->hqk", q[a:b], kr[a:b]) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        do = grad[a:b]  # (l, nh, hd)
        dv[a:b] = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vr[a:b])
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale  # (nh, l, l)
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kr[a:b])
        dk[a:b] = torch.einsum("hqk,qhd->khd", ds, q[a:b])
    fold = (k.shape[0], k.shape[1], g, k.shape[2])  # the query heads that share a kv head: summed
    return dq, dk.view(fold).sum(2), dv.view(fold).sum(2)


@torch.library.custom_op("growlength_test::varlen_fwd", mutates_args=(), device_types="cpu")
def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               deterministic: bool) -> torch.Tensor:
    check_varlen_contract(q, k, v, cu_seqlens, max_seqlen)
    CALLS.append(("varlen", tuple(q.shape), k.shape[1], cu_seqlens.numel(), max_seqlen, deterministic))
    return naive_segment_attention(q, k, v, cu_seqlens)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, deterministic):
    return torch.empty_like(q)


@torch.library.custom_op("growlength_test::varlen_bwd", mutates_args=(), device_types="cpu")
def varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _segment_grads(grad, q, k, v, cu_seqlens)


@varlen_bwd.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, _ = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _varlen_backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(grad.contiguous(), q, k, v, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.8's signature; causal self-attention only (what the model calls)."""
    assert causal and dropout_p == 0.0 and softmax_scale is None and cu_seqlens_q is cu_seqlens_k
    assert max_seqlen_q == max_seqlen_k
    return varlen_fwd(q, k, v, cu_seqlens_q, max_seqlen_q, deterministic)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.8's signature: q (B, T, nh, hd), k, v (B, T, nkv, hd) -> (B, T, nh, hd)."""
    assert causal and dropout_p == 0.0 and softmax_scale is None and q.dim() == 4
    B, T = q.shape[:2]
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    out = varlen_fwd(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]),
                     v.reshape(B * T, *v.shape[2:]), cu, T, deterministic)
    return out.view(q.shape)


def module() -> types.ModuleType:
    m = types.ModuleType("flash_attn")
    m.__version__ = "2.8.3-stand-in"
    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


def install(monkeypatch) -> list[tuple]:
    """Make this stand-in the `flash_attn` the model resolves (its cache cleared), with the CUDA/half gate lifted
    so the real glue runs on CPU fp32; returns the (cleared) call record."""
    from model import attention

    monkeypatch.setitem(sys.modules, "flash_attn", module())
    monkeypatch.setattr(attention, "FLASH_NEEDS_CUDA_HALF", False)
    monkeypatch.setattr(attention, "_logged", set())
    attention.forget_flash()
    monkeypatch.setattr(attention, "_flash_functions", None)  # restored (then forgotten again) at teardown
    CALLS.clear()
    return CALLS
