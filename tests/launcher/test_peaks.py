"""MFU peaks (launcher.metrics.peak_tflops) for device names as torch.cuda.get_device_name() reports them."""
import logging

import pytest

from launcher.metrics import peak_tflops

# NVIDIA's datasheets: Hopper/Blackwell/Ampere ones quote bf16 tensor-core TFLOP/s "with sparsity" (dense = half);
# the Ada ones (L40S, L40, L4) give the dense figure beside it.
DATASHEET_DENSE = [
    ("NVIDIA H100 80GB HBM3", 1979 / 2), ("NVIDIA H100 PCIe", 1513 / 2), ("NVIDIA H100 NVL", 1671 / 2),
    ("NVIDIA H200", 1979 / 2), ("NVIDIA H200 NVL", 1671 / 2), ("NVIDIA H800", 1979 / 2), ("NVIDIA H800 PCIe", 1513 / 2),
    ("NVIDIA B200", 4500 / 2), ("NVIDIA A10", 250 / 2), ("NVIDIA A100-SXM4-80GB", 624 / 2),
    ("NVIDIA A100 80GB PCIe", 624 / 2), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121),
]


@pytest.mark.parametrize("name, dense", DATASHEET_DENSE)
def test_dense_bf16_peak_per_gpu_variant(name, dense):
    assert peak_tflops(None, name) == pytest.approx(dense, abs=0.1)


def test_unknown_gpu_gives_no_peak_and_one_hint(caplog):
    with caplog.at_level(logging.INFO, logger="growlength"):
        assert peak_tflops(None, "NVIDIA A10G") is None  # not the A10 (whole tokens), not in NVIDIA's datasheets
        assert peak_tflops(None, "NVIDIA A10G") is None
        assert peak_tflops(None, None) is None  # CPU: no peak, no hint
    hints = [r.getMessage() for r in caplog.records if "peak table" in r.getMessage()]
    assert len(hints) == 1 and "'NVIDIA A10G'" in hints[0] and "mfu is null; pass --peak-tflops" in hints[0]
    assert peak_tflops(500.0, "NVIDIA A10G") == 500.0 and peak_tflops(100.0, "NVIDIA H100 PCIe") == 100.0
