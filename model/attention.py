"""Causal self-attention kernels: flash-attn's `flash_attn_func` or torch SDPA, chosen per forward.

`auto` takes flash-attn when it is installed and the tensors are CUDA fp16/bf16, else SDPA. `flash` where it
cannot run raises (no silent fallback). The choice is logged once per distinct (setting, backend, reason).
"""
from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# flash-attn only runs on CUDA in fp16/bf16. Tests set this to False to drive the real glue below on CPU fp32
# with a stand-in `flash_attn` module of the same signature (flash-attn cannot be installed on CPU machines).
FLASH_NEEDS_CUDA_HALF = True

_FIX = "set attention='sdpa' (or 'auto' to use flash-attn only where it can run)"
_logged: set[tuple[str, str, str]] = set()


def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not installed."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except ImportError:
        return None


def flash_unusable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why flash-attn cannot run here (None if it can). device/dtype None = check only the machine."""
    if FLASH_NEEDS_CUDA_HALF:
        if device is None:
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        elif device.type != "cuda":
            return f"the tensors are on {device.type}, flash-attn needs CUDA"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return f"the dtype is {dtype}, flash-attn needs float16 or bfloat16"
    if _flash_attn_func() is None:
        return "the flash-attn package is not installed (pip install flash-attn)"
    return None


def check_flash_requested(requested: str) -> None:
    """At model construction: `attention='flash'` on a machine where it can never run is a config error."""
    if requested == "flash":
        reason = flash_unusable_reason()
        if reason:
            raise RuntimeError(f"attention='flash' was requested but {reason}; {_FIX}")


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """'flash' or 'sdpa' for tensors on `device` in `dtype`, per the config's `attention` setting."""
    if requested == "sdpa":
        backend, why = "sdpa", "requested"
    else:
        reason = flash_unusable_reason(device, dtype)
        if requested == "flash" and reason:
            raise RuntimeError(f"attention='flash' was requested but {reason}; {_FIX}")
        backend, why = ("sdpa", reason) if reason else ("flash", "flash-attn available")
    if (requested, backend, why) not in _logged:
        _logged.add((requested, backend, why))
        kernel = "flash_attn_func(causal=True)" if backend == "flash" else "torch SDPA(is_causal=True)"
        log.info("attention backend: %s [%s] (attention=%s; %s)", backend, kernel, requested, why)
    return backend


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hd)) v, with grouped-query attention when k, v have fewer heads.

    q: (B, T, nh, hd), k, v: (B, T, nkv, hd) with nh % nkv == 0 (query head h reads key/value head
    h // (nh / nkv), as Llama's GQA); flash-attn's layout. Returns (B, T, nh, hd). Both kernels take the shared
    heads as they are, without materialising nh copies of k and v.
    """
    if backend == "flash":
        return _flash_attn_func()(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=k.shape[2] != q.shape[2])  # (B, nh, T, hd)
    return out.transpose(1, 2)  # (B, T, nh, hd)
