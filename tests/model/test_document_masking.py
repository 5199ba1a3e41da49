"""Document masking: a window packed with several documents gives each document the logits it has alone, in
every stage of a real sample index at micro-batch > 1, on SDPA's block-causal mask and on the flash-attn varlen
glue (driven by a stand-in with flash_attn_varlen_func's signature and layout); positions reset per document;
and the step's attention FLOPs counted by torch's FlopCounterMode on a kernel that computes exactly the pairs."""
import logging
import math
import sys
import types

import numpy as np
import pytest
import torch

from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.loader import StageLoader
from data_pipeline.samples import GrowLengthSamples
from model import CausalLM, ModelConfig
from model import attention as attention_mod
from model.attention import attention_pairs, causal_attention, check_cu_seqlens, documents

EOD, VOCAB = 2, 512
PLAN = [(16, 16 * 8), (32, 32 * 8), (64, 64 * 8)]  # 8 samples per stage


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, VOCAB, size=int(n)).tolist() + [EOD] for n in rng.integers(1, 12, size=200)]
    return GrowLengthSamples(write_dataset(str(tmp_path_factory.mktemp("d") / "d"), docs), PLAN, seed=3)


def model(preset, **kw):
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset(preset, vocab_size=VOCAB, document_masking=True, **kw)).eval()


def segments(cu):
    return list(zip(cu[:-1].tolist(), cu[1:].tolist()))


# ---------------------------------------------------------------- one document alone = the same document packed
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("reset", [False, True])
def test_packed_documents_have_their_own_logits_in_every_stage(samples, preset, reset):
    m = model(preset, attention="sdpa", reset_position_ids=reset)
    plain = model(preset, attention="sdpa")
    for stage in range(len(PLAN)):
        steps = list(StageLoader(samples, stage, micro_batch_size=2, grad_accum=2, rank=0, world_size=1,
                                 documents=True))
        for tokens, cu in steps[0] + steps[-1]:  # micro-batches of 2 windows
            x = tokens[:, :-1]
            B, T = x.shape
            assert len(cu) > B + 1  # at least one document starts inside a window
            with torch.no_grad():
                packed = m(x, cu_seqlens=cu).reshape(B * T, -1)
                unmasked = plain(x).reshape(B * T, -1)
                crossed = 0.0
                for a, b in segments(cu):
                    alone = m(x.reshape(-1)[a:b][None])[0]  # (b - a, V): the document by itself
                    torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
                    crossed = max(crossed, (unmasked[a:b] - alone).abs().max().item())
            assert crossed > 1e-3  # without masking the later documents do read the earlier ones
            # the loss is the mean over the same labels
            loss = m(x, labels=tokens[:, 1:], cu_seqlens=cu)
            with torch.no_grad():
                ref = torch.nn.functional.cross_entropy(packed, tokens[:, 1:].reshape(-1))
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_documents_layout_positions_and_mask_by_hand():
    cu = torch.tensor([0, 3, 4, 5, 8], dtype=torch.int32)  # rows of 4: [0 1 2 | 3] [4 | 5 6 7]
    docs = documents(cu, 2, 4, torch.device("cpu"), "sdpa")
    assert docs.max_seqlen == 4 and docs.cu_seqlens.dtype == torch.int32  # T bounds every segment: one shape
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 5] + [8] * 13  # padded with empty segments to 8 per row
    many = documents(torch.arange(0, 41, 2), 1, 40, torch.device("cpu"), "flash")  # 20 segments in one row
    assert many.cu_seqlens.tolist() == list(range(0, 41, 2)) + [40] * 12  # to the next power of two, 32
    assert docs.positions.tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert docs.mask.shape == (2, 1, 4, 4)
    assert docs.mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert docs.mask[1, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]


def test_reset_position_ids_gives_each_document_the_rope_angles_it_has_alone():
    cu = torch.tensor([0, 3, 4, 5, 8], dtype=torch.int32)
    docs = documents(cu, 2, 4, torch.device("cpu"), "flash")
    for preset in ("tiny", "tiny-llama"):
        m = model(preset, reset_position_ids=True)
        cos, sin = m.rotary_tables(4, torch.device("cpu"), docs)  # (B, T, r/2)
        table_cos, table_sin = m.rotary.get(4, torch.device("cpu"))
        assert cos.shape == (2, 4, m.config.rotary_dim // 2)
        for (a, b) in segments(cu):
            row, col = divmod(a, 4)
            assert torch.equal(cos[row, col:col + b - a], table_cos[:b - a])
            assert torch.equal(sin[row, col:col + b - a], table_sin[:b - a])
        kept, _ = model(preset).rotary_tables(4, torch.device("cpu"), docs)
        assert torch.equal(kept, table_cos)  # without reset: positions 0..T-1 in every row


# ---------------------------------------------------------------- kernels
def naive_segment_attention(q, k, v, cu):
    """q: (N, nh, hd), k, v: (N, nkv, hd) flattened; causal softmax attention inside each segment of cu."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = torch.empty_like(q)
    for a, b in segments(cu):
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / math.sqrt(q.shape[-1])
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v[a:b])
    return out


@pytest.mark.parametrize("nkv", [4, 2, 1])
def test_sdpa_block_causal_matches_naive_attention_per_document(nkv):
    torch.manual_seed(0)
    B, T = 3, 20
    q, k, v = torch.randn(B, T, 4, 8), torch.randn(B, T, nkv, 8), torch.randn(B, T, nkv, 8)
    cu = torch.tensor([0, 1, 9, 20, 21, 40, 41, 42, 55, 60], dtype=torch.int32)  # segments of 1 token too
    docs = documents(cu, B, T, torch.device("cpu"), "sdpa")
    out = causal_attention(q, k, v, "sdpa", docs).reshape(B * T, 4, 8)
    ref = naive_segment_attention(q.reshape(B * T, 4, 8), k.reshape(B * T, nkv, 8), v.reshape(B * T, nkv, 8), cu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def stand_in_flash_attn(calls, kernel=naive_segment_attention):
    """flash-attn 2's flash_attn_varlen_func (exact signature; q (total, nh, hd), k/v (total, nkv, hd), int32
    cu_seqlens on q's device, Python int max_seqlen, causal aligned per segment) and flash_attn_func."""
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        assert causal and dropout_p == 0.0 and softmax_scale is None
        assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and q.shape[1] % k.shape[1] == 0
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1  # flash-attn's layout requirement
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.device == q.device
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0]
        assert isinstance(max_seqlen_q, int) and max_seqlen_q >= int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append((tuple(q.shape), k.shape[1]))
        return kernel(q, k, v, cu_seqlens_q)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        B, T = q.shape[:2]
        calls.append(("dense", tuple(q.shape)))
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
        return kernel(q.reshape(B * T, *q.shape[2:]), k.reshape(B * T, *k.shape[2:]),
                      v.reshape(B * T, *v.shape[2:]), cu).view(q.shape)
    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func, flash_attn_func=flash_attn_func,
                                 __name__="flash_attn")


@pytest.fixture
def flash_stand_in(monkeypatch):
    def install(kernel=naive_segment_attention):
        calls = []
        monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn(calls, kernel))
        monkeypatch.setattr(attention_mod, "FLASH_NEEDS_CUDA_HALF", False)  # the real glue, on CPU fp32
        monkeypatch.setattr(attention_mod, "_logged", set())
        return calls
    return install


@pytest.mark.parametrize("preset, grad", [("tiny", "layers.0.attention.query_key_value.weight"),
                                          ("tiny-llama", "layers.0.self_attn.k_proj.weight")])
def test_flash_varlen_glue_matches_sdpa_block_causal(flash_stand_in, caplog, preset, grad):
    calls = flash_stand_in()
    sdpa, flash = model(preset, attention="sdpa", reset_position_ids=True), \
        model(preset, attention="flash", reset_position_ids=True)
    sdpa.train(), flash.train()
    x = torch.randint(0, VOCAB, (3, 17))
    cu = torch.tensor([0, 5, 17, 30, 34, 40, 51], dtype=torch.int32)
    with caplog.at_level(logging.INFO, logger="model.attention"):
        ref, out = sdpa(x, labels=x, cu_seqlens=cu), flash(x, labels=x, cu_seqlens=cu)
    nh, nkv = flash.config.num_heads, flash.config.num_kv_heads
    assert calls == [((51, nh, 16), nkv)] * 2  # one varlen call per layer, kv heads not repeated
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    out.backward()
    g_ref, g_out = dict(sdpa.named_parameters())[grad].grad, dict(flash.named_parameters())[grad].grad
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-6)
    logged = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert any("backend: flash [flash_attn_varlen_func" in m for m in logged)
    assert any("backend: sdpa [torch SDPA(dense block-causal" in m for m in logged)
    assert "flash_attn_varlen_func" in flash.attention_kernel(torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- FLOPs of the attention actually computed
def exact_pairs_attention(q, k, v, cu):
    """Causal attention that computes only the (query, key) pairs the mask admits, one query at a time, so that
    FlopCounterMode counts exactly the work a causal, per-document kernel does."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    rows = []
    for a, b in segments(cu):
        for i in range(a, b):
            keys, values = k[a:i + 1].transpose(0, 1), v[a:i + 1].transpose(0, 1)  # (nh, i + 1 - a, hd)
            scores = torch.bmm(q[i][:, None], keys.transpose(1, 2)) / math.sqrt(q.shape[-1])  # (nh, 1, i + 1 - a)
            rows.append(torch.bmm(scores.softmax(-1), values)[:, 0])  # (nh, hd); bmm: counted even at 1 key
    return torch.stack(rows)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_flops_equal_torchs_count_of_a_step_that_computes_only_those_pairs(flash_stand_in, preset,
                                                                                   masked):
    from torch.utils.flop_counter import FlopCounterMode

    flash_stand_in(exact_pairs_attention)
    m = model(preset, attention="flash").train()
    B, T = 2, 24
    x = torch.randint(0, VOCAB, (B, T + 1))
    cu = torch.tensor([0, 7, 8, 24, 30, 48], dtype=torch.int32) if masked else None
    with FlopCounterMode(display=False) as counter:
        m(x[:, :-1], labels=x[:, 1:], cu_seqlens=cu).backward()
    pairs = attention_pairs(B, T, cu)
    assert pairs == (7 * 8 + 1 * 2 + 16 * 17 + 6 * 7 + 18 * 19) // 2 if masked else B * T * (T + 1) // 2
    assert counter.get_total_flops() == m.matmul_flops_per_token() * B * T + m.attention_flops(pairs)
    # PaLM's figure counts the whole T x T square: more than was computed
    assert m.flops_per_token(T) * B * T == m.matmul_flops_per_token() * B * T + m.attention_flops(B * T * T)


def test_attention_pairs_equal_the_entries_of_the_mask():
    cu = torch.tensor([0, 1, 9, 20, 21, 40, 41, 42, 55, 60], dtype=torch.int32)
    docs = documents(cu, 3, 20, torch.device("cpu"), "sdpa")
    assert attention_pairs(3, 20, cu) == int(docs.mask.sum())
    assert attention_pairs(3, 20) == int(torch.ones(20, 20).tril().sum()) * 3


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("cu, match", [
    ([0, 5, 7], r"runs from 0 to 7, not from 0 to batch \* seq_len = 8"),
    ([0, 5, 5, 8], r"not strictly increasing"),
    ([0, 3, 8], r"lacks a row start \(a multiple of seq_len 4\)"),
    ([[0, 8]], r"a 1-D integer tensor"),
])
def test_bad_cu_seqlens_is_a_clear_error(cu, match):
    with pytest.raises(ValueError, match=r"cu_seqlens .*" + match):
        check_cu_seqlens(torch.tensor(cu), 2, 4)
    with pytest.raises(ValueError, match=match):
        model("tiny")(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor(cu))


def test_reset_position_ids_needs_document_masking():
    with pytest.raises(ValueError, match=r"reset_position_ids=True needs document_masking=True.*set both"):
        ModelConfig.from_preset("tiny", vocab_size=VOCAB, reset_position_ids=True)
