"""What document masking costs per optimizer step: the document boundaries and the mask against the step itself.
Prints a table; method and results: docs/benchmarks.md.

    python benchmarks/bench_document_masking.py                   # pythia-70m shape, fp32, 4096 tokens per step
    python benchmarks/bench_document_masking.py --preset tiny --lengths 128 1024 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline.indexed_dataset import write_dataset  # noqa: E402
from data_pipeline.samples import GrowLengthSamples  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402
from model.attention import documents  # noqa: E402

EOD = 2


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--mean-doc", type=int, default=400, help="median document length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n_docs = 4 * args.tokens_per_step * args.repeats // args.mean_doc + 8
    lengths = np.maximum(1, rng.lognormal(np.log(args.mean_doc), 1.0, n_docs).astype(np.int64))
    docs = [rng.integers(4, 8000, size=int(n)).tolist() + [EOD] for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(L, L * (args.tokens_per_step // L) * (args.repeats + 1)) for L in args.lengths]
        samples = GrowLengthSamples(write_dataset(f"{tmp}/d", docs), plan, seed=0).build()
        model = CausalLM(ModelConfig.from_preset(args.preset, vocab_size=8192, attention="sdpa",
                                                 document_masking=True, reset_position_ids=True))
        print(f"{args.preset}, fp32, {args.threads} threads, {args.tokens_per_step} tokens per step, documents "
              f"median {args.mean_doc} tokens (mean {lengths.mean():.0f})")
        print(f"{'L':>6} {'docs/win':>8} {'cu_seqlens ms':>13} {'layout ms':>10} {'masked step s':>13} "
              f"{'causal step s':>13} {'share':>7}")
        for k, L in enumerate(args.lengths):
            B = args.tokens_per_step // L
            t_cu, t_layout, t_masked, t_causal, segs = [], [], [], [], []
            for r in range(args.repeats + 1):  # the first round warms up
                rows = np.arange(r * B, (r + 1) * B)
                x = torch.from_numpy(samples.samples(k, rows))
                cu = [None]
                a = timed(lambda: cu.__setitem__(0, torch.from_numpy(samples.cu_seqlens(k, rows))))
                b = timed(lambda: documents(cu[0], B, L, torch.device("cpu"), "sdpa"))
                c = timed(lambda: model(x[:, :-1], labels=x[:, 1:], cu_seqlens=cu[0]).backward())
                d = timed(lambda: model(x[:, :-1], labels=x[:, 1:]).backward())
                if r:
                    t_cu.append(a), t_layout.append(b), t_masked.append(c), t_causal.append(d)
                    segs.append((len(cu[0]) - 1) / B)
            med = statistics.median
            share = (med(t_cu) + med(t_layout)) / med(t_masked)
            print(f"{L:>6} {statistics.mean(segs):>8.2f} {med(t_cu) * 1e3:>13.3f} {med(t_layout) * 1e3:>10.3f} "
                  f"{med(t_masked):>13.3f} {med(t_causal):>13.3f} {share:>7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
