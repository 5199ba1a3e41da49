"""One rank of launcher/pretrain.py with two instruments, for benchmarks/gpu_acceptance.py; it runs the launcher's
own `main()` unchanged.

    [deepspeed --num_gpus N] benchmarks/acceptance_rank.py --ds_config ... key=value ...   (the launcher's arguments)

GROWLENGTH_ACCEPTANCE_MEMORY=PREFIX writes the peak memory per training length to PREFIX.rank{R}.json (CUDA
max_memory_allocated, else VmHWM; read and reset when a training forward meets a new length).
GROWLENGTH_ACCEPTANCE_DETERMINISTIC=1 enforces torch's deterministic algorithms (an op without one is an error), so
a resumed run can be compared bit for bit.
"""
from __future__ import annotations

import json
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # import the repo's packages, as pretrain
sys.path.insert(0, os.path.dirname(_here))

if os.environ.get("GROWLENGTH_ACCEPTANCE_DETERMINISTIC") == "1":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must be set before cuBLAS starts

import torch  # noqa: E402

from data_pipeline.atomic import write_text  # noqa: E402


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_vm_hwm() -> bool:
    """Linux resets a process's peak RSS to its current RSS on ``5`` written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakPerLength:
    """Peak memory per training sequence length, from a global forward pre-hook on the model."""

    def __init__(self, model_class: type):
        self.model_class = model_class
        self.cuda = torch.cuda.is_available()
        self.peaks: dict[int, int] = {}
        self.current: int | None = None
        self.reset_ok = True
        self.backend: str | None = None
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._pre_forward)

    def _read(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _vm_hwm()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.reset_ok = _reset_vm_hwm() and self.reset_ok

    def _pre_forward(self, module, args):
        if not isinstance(module, self.model_class) or not torch.is_grad_enabled() or not args:
            return None
        seq_len = int(args[0].shape[-1])  # input_ids (B, T)
        if seq_len != self.current:
            self.close_length()
            self._reset()
            self.current = seq_len
            if self.backend is None and torch.distributed.is_initialized():
                self.backend = str(torch.distributed.get_backend())
        return None

    def close_length(self) -> None:
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), self._read())

    def report(self) -> dict:
        self.close_length()
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if self.cuda else None
        return {"device": "cuda" if self.cuda else "cpu", "measure": "max_memory_allocated" if self.cuda else
                "VmHWM (peak RSS)", "peak_bytes": {str(k): v for k, v in self.peaks.items()},
                "reset_per_length": self.reset_ok, "capacity_bytes": capacity, "backend": self.backend}


def main() -> int:
    if os.environ.get("GROWLENGTH_ACCEPTANCE_DETERMINISTIC") == "1":
        # enforced, not warn_only: under warn_only CUDA SDPA's memory-efficient backward keeps its split-key dQ
        # accumulation (arbitrary order) and a resumed fp32 run differs in the last bits for a reason not ours
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    from launcher import pretrain
    from model import CausalLM

    prefix = os.environ.get("GROWLENGTH_ACCEPTANCE_MEMORY")
    watch = PeakPerLength(CausalLM) if prefix else None
    try:
        return pretrain.main(sys.argv[1:])
    finally:
        if watch is not None:
            watch.handle.remove()
            rank = os.environ.get("RANK", "0")
            write_text(f"{prefix}.rank{rank}.json", json.dumps(watch.report(), indent=1))


if __name__ == "__main__":
    sys.exit(main())
