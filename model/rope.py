"""Rotary position embeddings (RoPE) with tables grown on demand: there is no fixed block size.

GPT-NeoX applies RoPE to the first `rotary_dim` dims of each head and uses the "rotate half" pairing: dim i is
rotated with dim i + rotary_dim/2 by angle pos * base^(-2i/rotary_dim).
"""
from __future__ import annotations

import torch


def inv_frequencies(rotary_dim: int, base: float, scaling: str = "none", factor: float = 1.0) -> torch.Tensor:
    """Rotation frequencies, fp32, shape (rotary_dim/2,).

    NTK-aware scaling (bloc97, 2023) raises the base to base * factor^(r/(r-2)) so the lowest frequency is
    interpolated by `factor` while the highest ones are left nearly untouched.
    """
    if scaling == "ntk":
        base = base * factor ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return 1.0 / (base ** exponents)


class RotaryCache:
    """fp32 cos/sin tables for positions 0..n-1, recomputed (larger) only when a longer sequence arrives.

    Kept as plain attributes, not buffers, so `model.to(torch.bfloat16)` cannot round them and they are not
    saved in checkpoints. Row p depends only on p, so a table for 128 positions equals the first 128 rows of a
    table for 512 (tested).
    """

    def __init__(self, rotary_dim: int, base: float, scaling: str = "none", factor: float = 1.0):
        self.rotary_dim = rotary_dim
        # Linear position interpolation (Chen et al. 2023): position p is treated as p / factor.
        self.position_scale = 1.0 / factor if scaling == "linear" else 1.0
        self.inv_freq = inv_frequencies(rotary_dim, base, scaling, factor)
        self.cos: torch.Tensor | None = None  # (n, rotary_dim/2) fp32
        self.sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device) -> None:
        positions = torch.arange(n, dtype=torch.float32, device=device) * self.position_scale
        angles = torch.outer(positions, self.inv_freq.to(device))  # (n, rotary_dim/2)
        self.cos, self.sin = angles.cos(), angles.sin()

    def get(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..seq_len-1, each (seq_len, rotary_dim/2) fp32 on `device`."""
        if self.cos is None or self.cos.shape[0] < seq_len or self.cos.device != torch.device(device):
            self._build(seq_len if self.cos is None else max(seq_len, self.cos.shape[0]), device)
        return self.cos[:seq_len], self.sin[:seq_len]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Out-of-place rotation of x's first 2*cos.shape[-1] dims, computed in fp32 (it touches only the rotary
    slice, a quarter of each head for Pythia) and stored in x's dtype; the other dims are copied unchanged."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = x.clone(memory_format=torch.contiguous_format)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:2 * half] = x2 * cos + x1 * sin
    return out


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: a rotation's gradient is the inverse rotation (angle -> -angle), so
    nothing but the tables is saved and no zero-filled slice gradients are built and summed."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head; the rest pass through.

    x: (B, T, nh, hd) or (B, T, nh, n, hd) (q and k stacked, n = 2), any float dtype; cos, sin: (T, r/2) fp32,
    or (B, T, r/2) when each row has its own positions (reset at document starts). Returns a new contiguous
    tensor of x's shape and dtype.
    """
    # (T, 1, [1,] r/2) or (B, T, 1, [1,] r/2): broadcast over heads
    shape = cos.shape[:-1] + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    return _Rotary.apply(x, cos.view(shape), sin.view(shape))
