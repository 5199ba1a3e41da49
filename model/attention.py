"""Causal self-attention kernels: flash-attn's `flash_attn_func` or torch SDPA, chosen per forward.

`auto` takes flash-attn when it imports, the tensors are CUDA fp16/bf16 and the GPU's compute capability is 8.0 or
newer (flash-attn 2 raises on V100/T4), else SDPA. `flash` where it cannot run raises (no silent fallback). A
flash-attn that is installed but fails to import (a build for another torch or CUDA) is reported with its own error,
not as "not installed". The choice is logged once per distinct (setting, backend, reason).
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


FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere, Ada, Hopper and newer


def _import_flash():
    """``(flash_attn.flash_attn_func, None)``, or ``(None, why it is unusable)``."""
    try:
        module = importlib.import_module("flash_attn")
    except ModuleNotFoundError as e:
        if e.name == "flash_attn":  # the package itself is absent (not a module it imports)
            return None, "the flash-attn package is not installed (pip install flash-attn)"
        why = f"{type(e).__name__}: {e}"
    except ImportError as e:  # e.g. its CUDA extension was built for another torch: "undefined symbol ..."
        why = f"ImportError: {e}"
    else:
        func = getattr(module, "flash_attn_func", None)
        if func is None:
            return None, (f"flash_attn {getattr(module, '__version__', '?')} has no flash_attn_func "
                          f"(flash-attn 2 is needed)")
        return func, None
    return None, (f"flash-attn is installed but does not import ({why}); rebuild it for this torch and CUDA "
                  f"(pip install flash-attn --no-build-isolation --force-reinstall)")


def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not installed or does not import."""
    return _import_flash()[0]


def _cuda_capability(device: torch.device | None) -> tuple[int, int] | None:
    """(major, minor) compute capability of ``device`` (None: the current CUDA device); None off CUDA."""
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


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
    capability = _cuda_capability(device)
    if capability is not None and tuple(capability) < FLASH_MIN_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]} and flash-attn 2 needs "
                f"{FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper)")
    return _import_flash()[1]


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
