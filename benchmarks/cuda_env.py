"""What this machine's GPU stack is, printed before any GPU test or benchmark; exit 1 when CUDA cannot be used.

    python benchmarks/cuda_env.py [--json OUT]

Prints torch, torch.version.cuda, cuDNN, NCCL, the NVIDIA driver, each GPU (name, memory, compute capability) and the
DeepSpeed, flash-attn and transformers versions. When ``torch.cuda.is_available()`` is false it ends with one line
saying why (a CPU build of torch, no driver, or the error CUDA's initialisation gave) and exits 1, so that
``make test-gpu`` fails instead of skipping every GPU test.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi() -> tuple[str | None, list[str]]:
    """(driver version, GPU lines) from nvidia-smi, or (None, []) when it is absent or fails."""
    if not shutil.which("nvidia-smi"):
        return None, []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, []
    rows = [r.split(", ") for r in out.stdout.strip().splitlines() if r.count(", ") >= 2]
    return (rows[0][0] if rows else None), [f"{r[1]} ({r[2]})" for r in rows]


def environment() -> dict:
    import torch
    driver, smi_gpus = _nvidia_smi()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "driver": driver, "nvidia_smi_gpus": smi_gpus, "deepspeed": _version("deepspeed"),
           "flash_attn": next((v for v in map(_version, ("flash-attn", "flash_attn")) if v != "not installed"),
                              "not installed"),
           "transformers": _version("transformers"), "cuda_available": False, "gpus": [], "why_not": None}
    try:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None
    except Exception:  # noqa: BLE001 - a torch built without NCCL
        env["nccl"] = None
    if torch.version.cuda is None:
        env["why_not"] = (f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): install a CUDA "
                          f"build, e.g. make test-gpu TORCH_SPEC='torch==X --index-url https://download.pytorch.org/"
                          f"whl/cuXYZ'")
        return env
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the reason is what we print
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        env["why_not"] = f"CUDA initialisation failed: {first}" + (
            "" if driver else " (nvidia-smi is not there or fails: no NVIDIA driver on this machine?)")
        return env
    env["cuda_available"] = torch.cuda.is_available()
    if not env["cuda_available"] or torch.cuda.device_count() == 0:
        env["cuda_available"] = False
        env["why_not"] = "torch sees no GPU (CUDA_VISIBLE_DEVICES hides them, or the driver shows none)"
        return env
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        env["gpus"].append(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm {p.major}.{p.minor}")
    return env


def report(env: dict) -> str:
    lines = [f"python {env['python']} | torch {env['torch']} | torch.version.cuda {env['torch_cuda']} | "
             f"cuDNN {env['cudnn']} | NCCL {env['nccl']}",
             f"NVIDIA driver {env['driver'] or 'not found (nvidia-smi)'} | deepspeed {env['deepspeed']} | "
             f"flash-attn {env['flash_attn']} | transformers {env['transformers']}"]
    lines += [f"GPU {g}" for g in env["gpus"]] or [f"nvidia-smi: {g}" for g in env["nvidia_smi_gpus"]]
    if env["why_not"]:
        lines.append(f"CUDA is not usable: {env['why_not']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the environment here")
    args = p.parse_args(argv)
    env = environment()
    print(report(env), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(env, f, indent=1)
    return 0 if env["cuda_available"] else 1


if __name__ == "__main__":
    sys.exit(main())
