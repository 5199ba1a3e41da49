"""Short CUDA checks beside the acceptance run: flash-attn's forward and backward against SDPA (both families), and
why the step-time measurer synchronizes. Skipped without CUDA; `make test-gpu` runs them."""
import dataclasses

import pytest
import torch

from launcher import steptime
from model import CausalLM, ModelConfig
from model.attention import flash_unusable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (make test-gpu on a GPU machine)")


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x[:, :-1], labels=x[:, 1:])
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["pythia-160m", "smollm2-135m"])
def test_flash_loss_and_gradients_match_sdpa_within_bf16(preset):
    reason = flash_unusable_reason(torch.device("cuda"), torch.bfloat16)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, vocab_size=8192, attention="sdpa")
    ref_model = CausalLM(config).cuda()
    x = torch.randint(0, 8192, (2, 1025), device="cuda")
    ref_loss, ref_grads = _loss_and_grads(ref_model, x)  # fp32 reference
    errors = {}
    for backend in ("sdpa", "flash"):
        model = CausalLM(dataclasses.replace(config, attention=backend)).cuda()
        model.load_state_dict(ref_model.state_dict())
        loss, grads = _loss_and_grads(model.to(torch.bfloat16), x)
        errors[backend] = (abs(loss - ref_loss).item(),
                           max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()))
    # flash's bf16 error is the same kind as SDPA's: a mask, scale or layout bug would be orders larger
    assert errors["flash"][0] <= 2 * errors["sdpa"][0] + 1e-3, errors
    assert errors["flash"][1] <= 2 * errors["sdpa"][1] + 1e-3, errors


def test_measure_with_synchronize_times_the_kernels_not_their_launch():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def step():
        for _ in range(10):
            a @ a  # ~11 TFLOP in all: milliseconds of GPU work, microseconds to launch

    synced = steptime.measure({1: step}, rounds=3, synchronize=torch.cuda.synchronize).median(1)
    torch.cuda.synchronize()
    launched = steptime.measure({1: step}, rounds=3).median(1)
    torch.cuda.synchronize()
    assert synced > 3 * launched, (synced, launched)
