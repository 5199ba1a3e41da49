"""Optimizer parameter groups: weight decay on the matrices only, as GPT-NeoX and Megatron do.

Biases and norm gains (parameters with fewer than two dimensions) go in a group pinned to `weight_decay: 0`; the
decayed group takes the DeepSpeed JSON's `optimizer.params.weight_decay` (DeepSpeed owns the optimizer).
"""
from __future__ import annotations

import torch


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Weight matrices and embeddings decay; biases and norm weights (1-D) do not."""
    return param.ndim >= 2


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two torch optimizer groups over the trainable parameters: ``[decayed, not decayed (weight_decay 0)]``.

    Each group also holds ``names`` (the parameter names, in order) so they can be logged and tested; torch
    optimizers keep extra keys of a group untouched.
    """
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = decay if is_decayed(name, p) else no_decay
            group["params"].append(p)
            group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def describe(groups: list[dict]) -> str:
    """``decayed 14 tensors (1.23M), not decayed 26 tensors (4.1k)``: one line for the start-up log."""
    parts = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        label = "not decayed" if g.get("weight_decay") == 0.0 else "decayed"
        size = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
        parts.append(f"{label} {len(g['params'])} tensors ({size})")
    return ", ".join(parts)
