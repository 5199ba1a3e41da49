"""Causal self-attention kernels, optionally kept within documents (`cu_seqlens`, see `Documents`), and the rule
that chooses one (`resolve_backend`; the table and the rule are in docs/gpu.md).

flash-attn (`flash_attn_func`, `flash_attn_varlen_func`), torch SDPA, and for documents without flash-attn torch's
`varlen_attn` or FlexAttention on CUDA; a dense block-causal mask only on the CPU. `flash` where it cannot run
raises, never a silent fallback; each decision is logged once. flash-attn is resolved once, never inside the
compiled forward; document layouts of a (B, T) batch share one shape (`max_seqlen = T`, `cu_seqlens` padded), so
torch.compile does not recompile per layout.
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
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 and torch's varlen kernel: Ampere, Ada, Hopper and newer
SDPA_PREFERRED_CAPABILITY = (9, 0)  # Hopper: cuDNN SDPA (FA3-class) over flash-attn 2's sm80 kernels

_FIX = "set attention='sdpa' (or 'auto' to use flash-attn only where it can run)"
_logged: set[tuple] = set()
KERNELS = {("flash", False): "flash_attn_func(causal=True)",
           ("flash", True): "flash_attn_varlen_func(causal=True, cu_seqlens per micro-batch)",
           ("sdpa", False): "torch SDPA(is_causal=True)",
           ("sdpa", True): "torch SDPA(dense block-causal mask within documents, CPU)",
           ("torch-varlen", True): "torch varlen_attn(causal, cu_seqlens per micro-batch)",
           ("flex", True): "torch flex_attention(document block mask)"}

_flash_functions: tuple | None = None  # (flash_attn_func, flash_attn_varlen_func, why unusable): resolved once


def _resolve_flash() -> tuple:
    try:
        module = importlib.import_module("flash_attn")
    except ModuleNotFoundError as e:
        if e.name == "flash_attn":  # the package itself is absent (not a module it imports)
            return None, None, "the flash-attn package is not installed (see docs/gpu.md: Installing flash-attn)"
        why = f"{type(e).__name__}: {e}"
    except ImportError as e:  # e.g. its CUDA extension was built for another torch: "undefined symbol ..."
        why = f"ImportError: {e}"
    else:
        func = getattr(module, "flash_attn_func", None)
        if func is None:
            return None, None, (f"flash_attn {getattr(module, '__version__', '?')} has no flash_attn_func "
                                f"(flash-attn 2 is needed)")
        return func, getattr(module, "flash_attn_varlen_func", None), None
    return None, None, (f"flash-attn is installed but does not import ({why}); rebuild it for this torch and CUDA "
                        f"(pip install flash-attn --no-build-isolation --force-reinstall)")


def flash_functions() -> tuple:
    """``(flash_attn_func, flash_attn_varlen_func, None)``, or ``(None, None, why it is unusable)``; imported on the
    first call and kept (the compiled forward reads the kept functions, so dynamo never sees an import)."""
    global _flash_functions
    if _flash_functions is None:
        _flash_functions = _resolve_flash()
    return _flash_functions


def forget_flash() -> None:
    """Drop the kept flash-attn functions (tests that swap the ``flash_attn`` module)."""
    global _flash_functions
    _flash_functions = None


def _cuda_capability(device: torch.device | None) -> tuple[int, int] | None:
    """(major, minor) compute capability of ``device`` (None: the current CUDA device); None off CUDA."""
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _half_sm80_problem(device: torch.device | None, dtype: torch.dtype | None, what: str) -> str | None:
    """Why a FlashAttention-2 kernel (flash-attn's or torch's) cannot run on ``device`` in ``dtype``."""
    if FLASH_NEEDS_CUDA_HALF:
        if device is None:
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        elif device.type != "cuda":
            return f"the tensors are on {device.type}, {what} needs CUDA"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return f"the dtype is {dtype}, {what} needs float16 or bfloat16"
    capability = _cuda_capability(device)
    if capability is not None and tuple(capability) < FLASH_MIN_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]} and {what} needs "
                f"{FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper)")
    return None


def flash_unusable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why flash-attn cannot run here (None if it can). device/dtype None = check only the machine."""
    return _half_sm80_problem(device, dtype, "flash-attn 2") or flash_functions()[2]


def check_flash_requested(requested: str) -> None:
    """At model construction: `attention='flash'` on a machine where it can never run is a config error."""
    if requested == "flash":
        reason = flash_unusable_reason()
        if reason:
            raise RuntimeError(f"attention='flash' was requested but {reason}; {_FIX}")


try:  # resolved at import, like flash-attn's functions: nothing is imported inside the compiled forward
    from torch.nn.attention.varlen import varlen_attn as _VARLEN_ATTN
except ImportError:  # torch before 2.10
    _VARLEN_ATTN = None


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    return _VARLEN_ATTN


def _documents_kernel(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(kernel, why) for document masking without flash-attn: never a dense mask on a GPU."""
    if device.type == "cpu":
        return "sdpa", "CPU: the dense block-causal mask"
    problem = _half_sm80_problem(device, dtype, "torch varlen_attn") if _torch_varlen() else \
        f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return ("flex", problem) if problem else ("torch-varlen", "torch's FlashAttention-2 varlen kernel")


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, masked: bool = False,
                    deterministic: bool = False) -> str:
    """The kernel (module docstring) for tensors on `device` in `dtype` per the config's `attention` setting;
    `masked`: attention is kept within documents; `deterministic`: model.deterministic_attention."""
    reason = None if requested == "sdpa" else flash_unusable_reason(device, dtype)
    if requested == "flash" and reason:
        raise RuntimeError(f"attention='flash' was requested but {reason}; {_FIX}")
    capability = _cuda_capability(device)
    if requested == "sdpa":
        backend, why = "sdpa", "requested"
    elif reason:
        backend, why = "sdpa", reason
    elif (requested == "auto" and not masked and not deterministic and capability is not None
          and tuple(capability) >= SDPA_PREFERRED_CAPABILITY):
        backend, why = "sdpa", (f"sm{capability[0]}{capability[1]}: SDPA (cuDNN attention on Hopper) over "
                                f"flash-attn 2's sm80 kernels")
    else:
        backend, why = "flash", "flash-attn available"
    if masked and backend == "sdpa":
        backend, kernel_why = _documents_kernel(device, dtype)
        why = f"{why}; documents: {kernel_why}"
    if deterministic and device.type == "cuda" and backend != "flash":
        _check_torch_deterministic(backend)
    if (requested, backend, why, masked, deterministic) not in _logged:
        _logged.add((requested, backend, why, masked, deterministic))
        log.info("attention backend: %s [%s] (attention=%s%s; %s)", backend, KERNELS[backend, masked], requested,
                 ", deterministic" if deterministic else "", why)
    return backend


def _check_torch_deterministic(backend: str) -> None:
    """torch's own CUDA attention backward (SDPA's flash, varlen_attn) accumulates dQ in a fixed order only under
    torch.use_deterministic_algorithms(True), and flex's is not promised at all: refuse what cannot be honoured."""
    if backend == "flex":
        raise RuntimeError("model.deterministic_attention=true: document masking here would run FlexAttention, "
                           "whose backward is not deterministic; train in bf16 on sm80+ or install flash-attn")
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError("model.deterministic_attention=true with torch's attention kernels needs "
                           "torch.use_deterministic_algorithms(True) (not warn_only) and "
                           "CUBLAS_WORKSPACE_CONFIG=:4096:8; the launcher sets both (or install flash-attn, which "
                           "takes deterministic=True itself)")


@dataclass
class Documents:
    """Where the documents of a (B, T) batch lie, in the layout the chosen kernel wants; built once per forward.

    cu_seqlens (capacity + 1,) int32: the start of every document segment over the B * T flattened tokens, then
    B * T repeated (empty segments) up to the capacity of `padded_cu_seqlens` (flash-attn's varlen layout; every
    row start b * T is one of them, so no segment crosses a row). max_seqlen: T, an upper bound of every segment (the kernels
    size their grids with it). positions: (B, T) long, each token's offset in its segment. mask: (B, 1, T, T) bool,
    True where query i may read key j (same segment, j <= i), for SDPA on the CPU, else None. block_mask:
    FlexAttention's BlockMask for the flex kernel, else None.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor
    mask: torch.Tensor | None
    block_mask: object | None = None


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


MIN_SEGMENTS_PER_ROW = 8  # the padded capacity's floor: typical data (documents of a few hundred tokens) and the
# compile warm-up's layout then share one capacity, so a stage compiles once


def padded_cu_seqlens(cu_seqlens: torch.Tensor, batch: int) -> torch.Tensor:
    """(n + 1,) document starts of a (batch, T) batch -> (c + 1,) int32, c the power of two >= max(n, 8 * batch), the
    tail repeating the total: empty segments, which the varlen kernels skip (each of their thread blocks returns when
    its rows lie past its segment's end). Not always B * T + 1 (the most segments a batch can have): every empty
    segment still launches (T / 128) x heads thread blocks, millions per call at 32k tokens."""
    n = cu_seqlens.numel() - 1
    capacity = 1 << (max(n, MIN_SEGMENTS_PER_ROW * batch) - 1).bit_length()
    out = torch.full((capacity + 1,), int(cu_seqlens[-1]), dtype=torch.int32)
    out[:n + 1] = cu_seqlens
    return out


def documents(cu_seqlens: torch.Tensor, batch: int, seq_len: int, device: torch.device, backend: str) -> Documents:
    """`Documents` for a (batch, seq_len) batch from its `cu_seqlens` (checked), in the layout `backend` (from
    resolve_backend) reads. Pass it on the CPU, as the loaders do: the checks then need no device synchronisation."""
    check_cu_seqlens(cu_seqlens, batch, seq_len)
    cu_seqlens = cu_seqlens.to("cpu", torch.int32)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device, non_blocking=True)  # (n,)
    padded = padded_cu_seqlens(cu_seqlens, batch).to(device=device, non_blocking=True)  # (c + 1,)
    total = batch * seq_len
    segment_start = torch.repeat_interleave(padded[:cu_seqlens.numel() - 1].long(), lengths,
                                            output_size=total)  # (B*T,)
    positions = (torch.arange(total, device=device) - segment_start).view(batch, seq_len)  # (B, T)
    mask = block_mask = None
    if backend == "sdpa":
        start = segment_start.view(batch, seq_len)
        # j may be read by i when it lies in i's segment and not after i: start_i <= j <= i (positions are flat)
        flat = torch.arange(total, device=device).view(batch, seq_len)
        mask = (flat[:, None, :] >= start[:, :, None]) & (flat[:, None, :] <= flat[:, :, None])  # (B, T, T)
        mask = mask[:, None]  # (B, 1, T, T)
    elif backend == "flex":
        block_mask = document_block_mask(segment_start.view(batch, seq_len), seq_len)
    return Documents(cu_seqlens=padded, max_seqlen=seq_len, positions=positions, mask=mask, block_mask=block_mask)


def attention_pairs(batch: int, seq_len: int, cu_seqlens=None) -> int:
    """(query, key) pairs a causal kernel computes for a (batch, seq_len) batch: sum of l (l + 1) / 2 over its
    segments, the rows (T (T + 1) / 2 each) without `cu_seqlens`, the documents with it (any integer sequence)."""
    if cu_seqlens is None:
        return batch * seq_len * (seq_len + 1) // 2
    cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    return int((lengths * (lengths + 1)).sum()) // 2


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     docs: Documents | None = None, deterministic: bool = False) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hd)) v, with grouped-query attention when k, v have fewer heads, kept within
    the segments of `docs` when given; `deterministic`: kernels whose backward has a fixed summation order.

    q: (B, T, nh, hd), k, v: (B, T, nkv, hd) with nh % nkv == 0 (query head h reads key/value head
    h // (nh / nkv), as Llama's GQA); flash-attn's layout. Returns (B, T, nh, hd). Every kernel takes the shared
    heads as they are, without materialising nh copies of k and v.
    """
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    if backend == "flash":
        flash_attn_func, flash_attn_varlen_func, _ = flash_functions()  # kept since resolve_backend
        if docs is None:
            return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True,
                                   deterministic=deterministic)
        out = flash_attn_varlen_func(
            q.reshape(B * T, nh, hd), k.reshape(B * T, nkv, hd), v.reshape(B * T, nkv, hd),  # (B*T, heads, hd)
            docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
            dropout_p=0.0, softmax_scale=None, causal=True, deterministic=deterministic)  # (B*T, nh, hd)
        return out.view(B, T, nh, hd)
    if backend == "torch-varlen":
        out = _torch_varlen()(q.reshape(B * T, nh, hd), k.reshape(B * T, nkv, hd), v.reshape(B * T, nkv, hd),
                              docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                              window_size=(-1, 0), enable_gqa=nkv != nh)  # (B*T, nh, hd); (-1, 0) is causal
        return out.view(B, T, nh, hd)
    if backend == "flex":
        return _flex_attention(q, k, v, docs.block_mask)
    mask = dict(is_causal=True) if docs is None else dict(attn_mask=docs.mask)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    if deterministic:  # (the CPU's kernels are these two anyway)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # no cuDNN, no memory-efficient
            out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=nkv != nh, **mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=nkv != nh, **mask)  # (B, nh, T, hd)
    return out.transpose(1, 2)  # (B, T, nh, hd)


# ---------------------------------------------------------------- FlexAttention (documents on CUDA, no varlen)
FLEX_BLOCK = 128  # FlexAttention's default block size


def document_block_mask(segment_start: torch.Tensor, seq_len: int):
    """FlexAttention BlockMask for causal attention within documents. segment_start: (B, T) long, the flat index of
    each token's document start. Built per (query block, key block) from the boundaries, never as a T x T mask.
    Documents are contiguous, so for key block j before query block i some pair is allowed iff i's first query's
    document starts at or before j's last key, and every pair iff i's last query's document starts at or before j's
    first key; the diagonal block is always partial."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T, device = segment_start.shape[0], seq_len, segment_start.device
    start = segment_start - torch.arange(B, device=device)[:, None] * T  # (B, T): document start within the row
    n = -(-T // FLEX_BLOCK)
    first = torch.arange(n, device=device) * FLEX_BLOCK  # (n,) first token of each block
    last = torch.clamp(first + FLEX_BLOCK - 1, max=T - 1)  # (n,) last token
    j = last[None, :]  # key blocks' last tokens, as columns
    below = torch.arange(n, device=device)[None, :] < torch.arange(n, device=device)[:, None]  # (n, n): j < i
    any_pair = below & (start[:, first][:, :, None] <= j)  # (B, n, n)
    full = below & (start[:, last][:, :, None] <= first[None, None, :])  # (B, n, n)
    partial = (any_pair & ~full) | torch.eye(n, dtype=torch.bool, device=device)  # (B, n, n)

    def as_indices(blocks: torch.Tensor):  # (B, n, n) bool -> counts (B, 1, n), indices (B, 1, n, n), used first
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= start[b, q_idx])

    return BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(T, T))


def _flex_attention(q, k, v, block_mask):
    """q (B, T, nh, hd), k, v (B, T, nkv, hd) -> (B, T, nh, hd) through flex_attention (compiled on CUDA: eager
    flex would materialise the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention if q.device.type == "cpu" or torch.compiler.is_compiling() else _compiled_flex()
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             enable_gqa=k.shape[2] != q.shape[2])  # (B, nh, T, hd)
    return out.transpose(1, 2)


_flex_compiled = None


def _compiled_flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled
