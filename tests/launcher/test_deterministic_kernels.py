"""model.deterministic_attention turns on torch's deterministic algorithms on CUDA (the SDPA / varlen backward reads
them) with cuBLAS's fixed workspace, and nothing on the CPU, whose kernels are deterministic already."""
import pytest
import torch

from launcher.modeling import deterministic_kernels
from model import ModelConfig
from model.attention import resolve_backend


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn)


def test_deterministic_attention_on_cuda_makes_torchs_kernels_deterministic(restore_determinism, monkeypatch):
    from model import attention

    monkeypatch.setattr(attention, "_cuda_capability", lambda device: (9, 0))
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)
    attention.forget_flash()
    cuda = torch.device("cuda")
    on = ModelConfig.from_preset("tiny", vocab_size=300, deterministic_attention=True)
    deterministic_kernels(ModelConfig.from_preset("tiny", vocab_size=300), cuda)
    deterministic_kernels(on, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="needs torch.use_deterministic_algorithms"):
        resolve_backend("auto", cuda, torch.bfloat16, masked=True, deterministic=True)
    deterministic_kernels(on, cuda)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert resolve_backend("auto", cuda, torch.bfloat16, masked=True, deterministic=True) == "torch-varlen"
    attention.forget_flash()
