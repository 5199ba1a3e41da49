"""Causal self-attention kernels, optionally kept within documents (`cu_seqlens`, see `Documents`).

flash-attn (`flash_attn_func`, or `flash_attn_varlen_func` with documents) or torch SDPA (`is_causal`, or a
block-causal mask with documents). `auto` takes flash-attn when it imports and can run (CUDA fp16/bf16, sm80+),
else SDPA; `flash` where it cannot run raises, never a silent fallback. The choice is logged once.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# flash-attn only runs on CUDA in fp16/bf16. Tests set this to False to drive the real glue below on CPU fp32
# with a stand-in `flash_attn` module of the same signature (flash-attn cannot be installed on CPU machines).
FLASH_NEEDS_CUDA_HALF = True

_FIX = "set attention='sdpa' (or 'auto' to use flash-attn only where it can run)"
_logged: set[tuple] = set()
KERNELS = {("flash", False): "flash_attn_func(causal=True)",
           ("flash", True): "flash_attn_varlen_func(causal=True, cu_seqlens per micro-batch)",
           ("sdpa", False): "torch SDPA(is_causal=True)",
           ("sdpa", True): "torch SDPA(block-causal mask within documents)"}


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


def _flash(name: str = "flash_attn_func"):
    """flash_attn.<name> (flash_attn_func, flash_attn_varlen_func), or None when flash-attn is not installed or does
    not import."""
    if _import_flash()[0] is None:
        return None
    return getattr(importlib.import_module("flash_attn"), name, None)


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


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, masked: bool = False) -> str:
    """'flash' or 'sdpa' for tensors on `device` in `dtype`, per the config's `attention` setting; `masked`:
    attention is kept within documents (only changes the kernel that is logged)."""
    if requested == "sdpa":
        backend, why = "sdpa", "requested"
    else:
        reason = flash_unusable_reason(device, dtype)
        if requested == "flash" and reason:
            raise RuntimeError(f"attention='flash' was requested but {reason}; {_FIX}")
        backend, why = ("sdpa", reason) if reason else ("flash", "flash-attn available")
    if (requested, backend, why, masked) not in _logged:
        _logged.add((requested, backend, why, masked))
        log.info("attention backend: %s [%s] (attention=%s; %s)", backend, KERNELS[backend, masked], requested, why)
    return backend


@dataclass
class Documents:
    """Where the documents of a (B, T) batch lie, in the layouts the kernels want; built once per forward.

    cu_seqlens (n + 1,) int32: the start of every document segment over the B * T flattened tokens, then B * T
    (flash-attn's varlen layout; every row start b * T is one of them, so no segment crosses a row).
    max_seqlen: the longest segment. mask: (B, 1, T, T) bool, True where query i may read key j (same segment,
    j <= i), for SDPA; None for flash. positions: (B, T) long, each token's offset in its segment.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor
    mask: torch.Tensor | None


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """Raise ValueError unless `cu_seqlens` is a valid segmentation of a (batch, seq_len) batch (class doc)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    total = batch * seq_len
    problem = None
    if cu.dim() != 1 or cu.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        problem = f"a 1-D integer tensor of at least 2 entries is needed, got {cu_seqlens.dtype} {tuple(cu.shape)}"
    elif cu[0] != 0 or cu[-1] != total:
        problem = f"it runs from {int(cu[0])} to {int(cu[-1])}, not from 0 to batch * seq_len = {total}"
    elif (cu[1:] <= cu[:-1]).any():
        problem = "it is not strictly increasing (empty or reversed segments)"
    elif not torch.isin(torch.arange(0, total, seq_len), cu).all():
        problem = f"it lacks a row start (a multiple of seq_len {seq_len}): a segment would cross two rows"
    if problem:
        raise ValueError(f"cu_seqlens {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}: {problem}; give "
                         f"document starts over the flattened (batch, seq_len) tokens, every row start included")


def documents(cu_seqlens: torch.Tensor, batch: int, seq_len: int, device: torch.device,
              need_mask: bool) -> Documents:
    """`Documents` for a (batch, seq_len) batch from its `cu_seqlens` (checked). Pass it on the CPU, as the
    loaders do: the checks and max_seqlen then need no device synchronisation."""
    check_cu_seqlens(cu_seqlens, batch, seq_len)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (n,)
    max_seqlen = int(lengths.max())
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
    lengths = lengths.to(device, non_blocking=True)
    total = batch * seq_len
    segment_start = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=total)  # (B*T,)
    positions = (torch.arange(total, device=device) - segment_start).view(batch, seq_len)  # (B, T)
    mask = None
    if need_mask:
        start = segment_start.view(batch, seq_len)
        # j may be read by i when it lies in i's segment and not after i: start_i <= j <= i (positions are flat)
        flat = torch.arange(total, device=device).view(batch, seq_len)
        mask = (flat[:, None, :] >= start[:, :, None]) & (flat[:, None, :] <= flat[:, :, None])  # (B, T, T)
        mask = mask[:, None]  # (B, 1, T, T)
    return Documents(cu_seqlens=cu, max_seqlen=max_seqlen, positions=positions, mask=mask)


def attention_pairs(batch: int, seq_len: int, cu_seqlens=None) -> int:
    """(query, key) pairs a causal kernel computes for a (batch, seq_len) batch: sum of l (l + 1) / 2 over its
    segments, the rows (T (T + 1) / 2 each) without `cu_seqlens`, the documents with it (any integer sequence)."""
    if cu_seqlens is None:
        return batch * seq_len * (seq_len + 1) // 2
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    return int((lengths * (lengths + 1)).sum()) // 2


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     docs: Documents | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hd)) v, with grouped-query attention when k, v have fewer heads, kept within
    the segments of `docs` when given.

    q: (B, T, nh, hd), k, v: (B, T, nkv, hd) with nh % nkv == 0 (query head h reads key/value head
    h // (nh / nkv), as Llama's GQA); flash-attn's layout. Returns (B, T, nh, hd). Both kernels take the shared
    heads as they are, without materialising nh copies of k and v.
    """
    B, T, nh, hd = q.shape
    if backend == "flash":
        if docs is None:
            return _flash()(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True)
        nkv = k.shape[2]
        out = _flash("flash_attn_varlen_func")(
            q.reshape(B * T, nh, hd), k.reshape(B * T, nkv, hd), v.reshape(B * T, nkv, hd),  # (B*T, heads, hd)
            docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
            dropout_p=0.0, softmax_scale=None, causal=True)  # (B*T, nh, hd)
        return out.view(B, T, nh, hd)
    mask = dict(is_causal=True) if docs is None else dict(attn_mask=docs.mask)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=k.shape[2] != nh, **mask)  # (B, nh, T, hd)
    return out.transpose(1, 2)  # (B, T, nh, hd)
