"""The attention kernels under torch.compile and without flash-attn, on the CPU.

flash-attn is replaced by tests/model/flash_stand_in.py (CPU custom ops with its signatures, fake kernels and
autograd, so dynamo captures them as it captures the real ones); torch's varlen_attn (CUDA only) by a custom op of its
signature; FlexAttention runs for real. References: SDPA with the dense block-causal mask, and a per-document
softmax loop. The GPU's compute capability is injected at its boundary (attention._cuda_capability)."""
import logging

import pytest
import torch
import torch._dynamo

from model import CausalLM, ModelConfig
from model import attention as attention_mod
from model.attention import causal_attention, document_block_mask, documents, resolve_backend

import flash_stand_in

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it
VOCAB = 256


def block_and_inputs(preset, B=2, T=24, **kw):
    torch.manual_seed(0)
    m = CausalLM(ModelConfig.from_preset(preset, vocab_size=VOCAB, **kw))
    x = torch.randn(B, T, m.config.hidden_size, requires_grad=True)  # (B, T, d)
    cos, sin = m.rotary_tables(T, torch.device("cpu"))
    return m, m.layers[0], x, cos, sin


def layouts(B, T):
    """Six document layouts of a (B, T) batch with 5..8 segments (one padded capacity), different longest ones."""
    cuts = [[5], [3, 17], [1, 2, 20], [9], [4, 8, 12], [23]]  # inner starts of row 0; row 1 gets 11 (and 7)
    out = []
    for i, c in enumerate(cuts):
        starts = [0] + c + [T] + ([T + 11] if i % 2 else [T + 7, T + 11])
        while len(starts) < 5:
            starts.append(T + 13 + len(starts))
        out.append(torch.tensor(sorted(set(starts)) + [B * T], dtype=torch.int32))
    return out


# ---------------------------------------------------------------- one graph per block, no recompiles
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("masked", [False, True])
def test_block_with_flash_is_one_graph_without_breaks(monkeypatch, preset, masked):
    flash_stand_in.install(monkeypatch)
    m, block, x, cos, sin = block_and_inputs(preset, attention="flash")
    docs = documents(layouts(2, 24)[1], 2, 24, x.device, "flash") if masked else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin, "flash", docs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert flash_stand_in.CALLS  # the stand-in op ran (inside the captured graph)


def test_block_with_flex_is_one_graph_without_breaks():
    m, block, x, cos, sin = block_and_inputs("tiny-llama")
    docs = documents(layouts(2, 24)[2], 2, 24, x.device, "flex")
    torch._dynamo.reset()
    with torch.no_grad():  # FlexAttention has no CPU backward (torch 2.13)
        explained = torch._dynamo.explain(block)(x, cos, sin, "flex", docs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("backend", ["flash", "torch-varlen", "flex"])
def test_new_document_layouts_do_not_recompile(monkeypatch, backend):
    flash_stand_in.install(monkeypatch)
    monkeypatch.setattr(attention_mod, "_torch_varlen", lambda: stand_in_varlen_attn)
    m, block, x, cos, sin = block_and_inputs("tiny-llama")
    resolve_backend("flash", x.device, x.dtype, masked=True)  # as CausalLM.forward does before the blocks
    torch._dynamo.reset()
    compiles = []
    compiled = torch.compile(block, dynamic=False, backend="eager")

    def count(args):
        compiles.append(args.compile_id)

    torch._dynamo.callback_handler.register_start_callback(count)
    try:
        for cu in layouts(2, 24):
            docs = documents(cu, 2, 24, x.device, backend)
            if backend == "flex":  # no CPU backward (torch 2.13); its block mask is a new object every batch
                with torch.no_grad():
                    compiled(x, cos, sin, backend, docs)
            else:
                compiled(x, cos, sin, backend, docs).sum().backward()
    finally:
        torch._dynamo.callback_handler.start_callbacks.remove(count)
    assert len(compiles) == 1, f"{len(compiles)} compiles for 6 layouts"
    if backend == "flex":
        return
    assert len({c[3] for c in flash_stand_in.CALLS}) == 1  # one cu_seqlens length for all six
    assert {c[4] for c in flash_stand_in.CALLS} == {24}  # max_seqlen = T


# ---------------------------------------------------------------- padded layout = unpadded reference
def reference_attention(q, k, v, cu, B, T):
    """SDPA with the dense block-causal mask (the CPU path), from the unpadded boundaries."""
    return causal_attention(q, k, v, "sdpa", documents(cu, B, T, torch.device("cpu"), "sdpa"))


@pytest.mark.parametrize("backend", ["flash", "torch-varlen", "flex"])
@pytest.mark.parametrize("nkv", [4, 2])
def test_document_kernels_match_the_dense_mask_reference(monkeypatch, backend, nkv):
    flash_stand_in.install(monkeypatch)
    monkeypatch.setattr(attention_mod, "_torch_varlen", lambda: stand_in_varlen_attn)
    B, T = 3, 150  # flex: two blocks of 128 per row, the second one short
    torch.manual_seed(0)
    q = torch.randn(B, T, 4, 16, requires_grad=True)
    k, v = (torch.randn(B, T, nkv, 16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 5, 130, 150, 151, 300, 301, 310, 440, 450], dtype=torch.int32)  # 9 segments: padded
    docs = documents(cu, B, T, q.device, backend)
    if backend != "flex":
        assert docs.cu_seqlens.numel() == 33 and docs.cu_seqlens[9:].tolist() == [450] * 24  # 8 per row: 24 -> 32
    if backend == "flex":  # FlexAttention has no CPU backward (torch 2.13): forward only
        q, k, v = q.detach(), k.detach(), v.detach()
    out = causal_attention(q, k, v, backend, docs)
    ref = reference_attention(q, k, v, cu, B, T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if backend == "flex":
        return
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_flex_block_mask_skips_exactly_the_blocks_outside_every_document():
    """Block level: a (query block, key block) tile is listed iff the dense mask has a True in it, and listed as
    full iff it is all True (then FlexAttention skips mask_mod there)."""
    B, T = 2, 600
    cu = torch.tensor([0, 100, 140, 500, 600, 601, 900, 1200], dtype=torch.int32)
    docs = documents(cu, B, T, torch.device("cpu"), "flex")
    dense = documents(cu, B, T, torch.device("cpu"), "sdpa").mask[:, 0]  # (B, T, T)
    n, bs = -(-T // 128), 128
    tiles = torch.zeros(B, n, n, dtype=torch.bool)
    full = torch.zeros(B, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            tile = dense[:, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
            tiles[:, i, j], full[:, i, j] = tile.flatten(1).any(1), tile.flatten(1).all(1)
    bm = docs.block_mask
    listed = bm.to_dense()[:, 0].bool()  # partial and full tiles
    assert torch.equal(listed, tiles)
    got_full = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            got_full[b, i, bm.full_kv_indices[b, 0, i, :bm.full_kv_num_blocks[b, 0, i]].long()] = True
    assert torch.equal(got_full, full)
    assert tiles.sum() < n * (n + 1) // 2 * B  # some causal tiles are skipped: the mask is sparse here


def stand_in_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn's signature (torch 2.13); (-1, 0) is its causal window."""
    assert window_size == (-1, 0) and scale is None and cu_seq_q is cu_seq_k and max_q == max_k
    assert enable_gqa == (query.shape[1] != key.shape[1])
    return flash_stand_in.varlen_fwd(query, key, value, cu_seq_q, max_q, False)


# ---------------------------------------------------------------- which kernel, by rule
def test_documents_on_cuda_never_take_the_dense_mask(monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # flash-attn not installed
    monkeypatch.setattr(attention_mod, "_logged", set())
    monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (8, 0))
    with caplog.at_level(logging.INFO, logger="model.attention"):
        assert resolve_backend("auto", CUDA, torch.bfloat16, masked=True) == "torch-varlen"
        assert resolve_backend("sdpa", CUDA, torch.float16, masked=True) == "torch-varlen"
        assert resolve_backend("auto", CUDA, torch.float32, masked=True) == "flex"  # fp32: no FA2 kernel
        assert resolve_backend("auto", CUDA, torch.bfloat16, masked=False) == "sdpa"
        monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (7, 5))
        assert resolve_backend("auto", CUDA, torch.bfloat16, masked=True) == "flex"
        assert resolve_backend("auto", torch.device("cpu"), torch.float32, masked=True) == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and all(line.startswith("attention backend: ") for line in lines)
    assert "torch varlen_attn" in lines[0] and "dtype is torch.float32, torch varlen_attn needs" in lines[2]
    monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (8, 0))
    with pytest.raises(RuntimeError, match=r"attention='flash' was requested but the flash-attn package is not "
                                           r"installed .*; set attention='sdpa'"):
        resolve_backend("flash", CUDA, torch.bfloat16, masked=True)


# ---------------------------------------------------------------- deterministic attention
def test_deterministic_attention_reaches_flash_and_restricts_sdpa(monkeypatch):
    calls = flash_stand_in.install(monkeypatch)
    x = torch.randint(0, VOCAB, (2, 16))
    for masked in (None, torch.tensor([0, 5, 16, 32], dtype=torch.int32)):
        calls.clear()
        CausalLM(ModelConfig.from_preset("tiny", vocab_size=VOCAB, attention="flash", document_masking=True,
                                         deterministic_attention=True))(x, cu_seqlens=masked)
        assert [c[5] for c in calls] == [True, True]  # deterministic=True in both layers' calls
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for det in (True, False):
        CausalLM(ModelConfig.from_preset("tiny", vocab_size=VOCAB, attention="sdpa",
                                         deterministic_attention=det))(x)
    assert seen[0] == (False, False, True, True)  # deterministic: flash or math only
    assert seen[2] == (True, True, True, True)


def test_deterministic_torch_kernels_need_torchs_deterministic_mode(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)
    monkeypatch.setattr(attention_mod, "_cuda_capability", lambda device: (9, 0))
    with pytest.raises(RuntimeError, match=r"deterministic_attention=true with torch's attention kernels needs "
                                           r"torch.use_deterministic_algorithms\(True\)"):
        resolve_backend("auto", CUDA, torch.bfloat16, deterministic=True)
    with pytest.raises(RuntimeError, match=r"FlexAttention, whose backward is not deterministic"):
        resolve_backend("auto", CUDA, torch.float32, masked=True, deterministic=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_backend("auto", CUDA, torch.bfloat16, masked=True, deterministic=True) == "torch-varlen"
    finally:
        torch.use_deterministic_algorithms(was)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, deterministic=True) == "sdpa"
