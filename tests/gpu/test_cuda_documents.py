"""Document masking on CUDA: every kernel the rule can choose there (flash-attn's varlen, torch's varlen_attn,
FlexAttention with the document block mask) against the dense block-causal mask on the CPU in fp32, forward and
backward; deterministic attention repeats its bits; new layouts do not recompile a compiled block. Skipped without
CUDA; `make test-gpu` runs them."""
import pytest
import torch
import torch._dynamo

from model import CausalLM, ModelConfig
from model import attention
from model.attention import causal_attention, documents, flash_unusable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
CUDA = torch.device("cuda")
B, T, NH, NKV, HD = 4, 1000, 8, 2, 64


def layout(seed: int) -> torch.Tensor:
    """Random document starts over (B, T): every row start, plus 1-7 documents inside each row."""
    g = torch.Generator().manual_seed(seed)
    starts = {b * T for b in range(B)}
    for b in range(B):
        n = int(torch.randint(1, 8, (1,), generator=g))  # at most 8 segments a row: one padded capacity
        starts |= {b * T + int(c) for c in torch.randint(1, T, (n,), generator=g)}
    return torch.tensor(sorted(starts) + [B * T], dtype=torch.int32)


def unusable(backend: str, dtype: torch.dtype) -> str | None:
    if backend == "flash":
        return flash_unusable_reason(CUDA, dtype)
    if backend == "torch-varlen":
        return attention._half_sm80_problem(CUDA, dtype, "torch varlen_attn") if attention._torch_varlen() else \
            "this torch has no varlen_attn"
    return None


def attention_and_grads(q, k, v, backend, docs, deterministic=False):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v, backend, docs, deterministic)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype)
    grads = torch.autograd.grad((out * weight).float().sum(), (q, k, v))
    return [t.detach().float().cpu() for t in (out, *grads)]


@pytest.mark.parametrize("backend, dtype", [("flash", torch.bfloat16), ("torch-varlen", torch.bfloat16),
                                            ("flex", torch.float32), ("flex", torch.bfloat16)])
def test_document_kernel_matches_the_dense_mask_reference(backend, dtype):
    reason = unusable(backend, dtype)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, NH, HD), torch.randn(B, T, NKV, HD), torch.randn(B, T, NKV, HD)
    cu = layout(0)
    ref = attention_and_grads(q, k, v, "sdpa", documents(cu, B, T, torch.device("cpu"), "sdpa"))
    got = attention_and_grads(q.to(CUDA, dtype), k.to(CUDA, dtype), v.to(CUDA, dtype), backend,
                              documents(cu, B, T, CUDA, backend))
    tol = 2e-4 if dtype == torch.float32 else 5e-2  # a mask error moves entries by O(1)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert (a - b).abs().max().item() < tol * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("backend", ["flash", "torch-varlen"])
def test_deterministic_attention_repeats_its_gradients_bit_for_bit(backend, monkeypatch):
    reason = unusable(backend, torch.bfloat16)
    if reason:
        pytest.skip(reason)
    if backend == "torch-varlen":  # what the launcher turns on for model.deterministic_attention
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, h, HD, device=CUDA, dtype=torch.bfloat16) for h in (NH, NKV, NKV))
        docs = documents(layout(1), B, T, CUDA, backend)
        first = attention_and_grads(q, k, v, backend, docs, deterministic=True)
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(first, attention_and_grads(q, k, v, backend, docs, True)))
    finally:
        if backend == "torch-varlen":
            torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("backend", ["flash", "torch-varlen", "flex"])
def test_compiled_block_takes_six_layouts_without_recompiling(backend):
    dtype = torch.bfloat16
    reason = unusable(backend, dtype)
    if reason:
        pytest.skip(reason)
    attention.flash_functions()  # as CausalLM.forward resolves before the blocks
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=512)).to(CUDA, dtype)
    block = model.layers[0]
    x = torch.randn(B, T, model.config.hidden_size, device=CUDA, dtype=dtype, requires_grad=True)
    cos, sin = model.rotary_tables(T, CUDA)
    torch._dynamo.reset()
    compiles = []

    def count(args):
        compiles.append(args.compile_id)

    compiled = torch.compile(block, dynamic=False)
    torch._dynamo.callback_handler.register_start_callback(count)
    try:
        for seed in range(6):
            compiled(x, cos, sin, backend, documents(layout(seed), B, T, CUDA, backend)).float().sum().backward()
    finally:
        torch._dynamo.callback_handler.start_callbacks.remove(count)
    assert len(compiles) == 1, f"{len(compiles)} compiles for 6 layouts"
