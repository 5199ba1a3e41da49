"""Step time with and without the loader's prefetch thread, reading a large .bin cold (its pages evicted before every
pass). Prints median step time and data wait per variant; method and results: docs/benchmarks.md.

    python benchmarks/bench_prefetch.py [--work-dir .cache/bench_prefetch] [--gb 2] [--seq-len 1024]
        [--micro-batch 8] [--grad-accum 4] [--steps 12] [--rounds 2] [--compute sleep:0.05|model]
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.indexed_dataset import IndexedDatasetBuilder, bin_path  # noqa: E402
from data_pipeline.loader import StageLoader  # noqa: E402
from data_pipeline.samples import GrowLengthSamples  # noqa: E402
from launcher.data import PREFETCH_STEPS  # noqa: E402


def make_bin(prefix: str, gib: float, seed: int = 0) -> None:
    """Random uint16 documents (64-4095 tokens, EOD id 2 last) totalling about ``gib`` GiB, in 64 Mi-token chunks."""
    rng = np.random.default_rng(seed)
    total = int(gib * (1 << 30)) // 2
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as b:
        written = 0
        while written < total:
            lengths = rng.integers(64, 4096, size=(1 << 26) // 2048)
            tokens = rng.integers(4, 8192, size=int(lengths.sum()), dtype=np.uint16)
            tokens[np.cumsum(lengths) - 1] = 2
            b.add_documents(tokens, lengths)
            written += tokens.size
        b.finalize()


def evict(samples: GrowLengthSamples) -> float:
    """Drop the .bin's pages from the page cache; returns the share still resident (fincore; nan without it).

    Pages this process has mapped stay cached until it unmaps them, so its own mapping lets go of them first
    (madvise); dirty pages of a fresh file are written back first (fsync)."""
    samples.dataset.tokens._mmap.madvise(mmap.MADV_DONTNEED)
    path = samples.dataset.bin_path
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return resident_share(path)


def resident_share(path: str) -> float:
    if not shutil.which("fincore"):
        return float("nan")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", path],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) / max(1, int(out[1])) if len(out) == 2 else float("nan")


def make_compute(spec: str, seq_len: int):
    if spec.startswith("sleep:"):
        seconds = float(spec.split(":", 1)[1])
        return lambda micro_batches: time.sleep(seconds)
    if spec != "model":
        raise SystemExit(f"--compute {spec!r}: use sleep:SECONDS or model")
    import torch
    from model import CausalLM, ModelConfig
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=8192))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(micro_batches):
        for mb in micro_batches:  # (mbs, seq_len + 1)
            model(mb[:, :-1], labels=mb[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def one_pass(samples, args, prefetch: int, compute) -> tuple[list[float], list[float]]:
    loader = StageLoader(samples, 0, args.micro_batch, args.grad_accum, rank=0, world_size=1, prefetch=prefetch)
    steps, waits = [], []
    batches = iter(loader)
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            micro_batches = next(batches)
            waits.append(time.perf_counter() - t0)
            compute(micro_batches)
            steps.append(time.perf_counter() - t0)
    finally:
        loader.close()
    return steps, waits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench_prefetch"))
    p.add_argument("--gb", type=float, default=2.0, help="size of the .bin in GiB")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compute", default="sleep:0.05", help="sleep:SECONDS (a GPU step) or model (tiny, on CPU)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = str(work / f"random_{args.gb:g}gib")
    if not Path(bin_path(prefix)).exists():
        t0 = time.perf_counter()
        make_bin(prefix, args.gb)
        print(f"wrote {bin_path(prefix)} ({os.path.getsize(bin_path(prefix)) / (1 << 30):.2f} GiB) in "
              f"{time.perf_counter() - t0:.0f}s")
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    samples = GrowLengthSamples(prefix, [(args.seq_len, tokens_per_step * args.steps)], seed=0)
    compute = make_compute(args.compute, args.seq_len)
    compute(StageLoader(samples, 0, args.micro_batch, args.grad_accum, 0, 1).read_step(0))  # warm the compute
    results = {0: ([], []), PREFETCH_STEPS: ([], [])}
    for r in range(args.rounds):
        for prefetch in results:
            resident = evict(samples)
            steps, waits = one_pass(samples, args, prefetch, compute)
            results[prefetch][0].extend(steps[1:])  # the first step waits for its data with or without prefetch
            results[prefetch][1].extend(waits[1:])
            print(f"round {r} prefetch={prefetch}: resident before {resident:.1%}; median step "
                  f"{statistics.median(steps[1:]) * 1e3:.1f} ms, data wait {statistics.median(waits[1:]) * 1e3:.2f} ms"
                  f"; first step {steps[0] * 1e3:.1f} ms")
    print(f"\n{os.path.getsize(bin_path(prefix)) / (1 << 30):.2f} GiB .bin read cold; seq_len {args.seq_len}, "
          f"micro-batch {args.micro_batch} x accum {args.grad_accum} ({tokens_per_step:,} tokens/step), compute "
          f"{args.compute}; medians over {args.rounds} rounds x {args.steps - 1} steps (first step of a pass left out)")
    print(f"{'prefetch':>8} {'step ms':>9} {'data wait ms':>13} {'mean wait ms':>13}")
    for prefetch, (steps, waits) in results.items():
        print(f"{prefetch:>8} {statistics.median(steps) * 1e3:>9.1f} {statistics.median(waits) * 1e3:>13.2f} "
              f"{statistics.fmean(waits) * 1e3:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
