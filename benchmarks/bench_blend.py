"""The mixture blend order (data_pipeline.blend) against megatron-core's C++ `helpers.build_blending_indices` for the
same weights and size; checks the two orders are equal, prints both times. Results: docs/benchmarks.md.

    python benchmarks/bench_blend.py [--samples 10000000] [--sources 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline.blend import blend_order, normalise_weights  # noqa: E402


def megatron_order(weights: np.ndarray, size: int) -> np.ndarray:
    from megatron.core.datasets import helpers  # imported once in main(), outside the timing
    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(source, sample, weights, len(weights), size, False)
    return source


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000_000)
    p.add_argument("--sources", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.helpers  # noqa: F401  (its import takes seconds; keep it out of the timing)
    weights = normalise_weights(np.random.default_rng(0).random(a.sources))
    ours, theirs = [], []
    for _ in range(a.repeats):  # interleaved, so machine noise hits both alike
        t_ours, (src, _) = timed(lambda: blend_order(weights, a.samples))
        t_meg, ref = timed(lambda: megatron_order(weights, a.samples))
        if not np.array_equal(src, ref):
            sys.exit("blend orders differ from megatron-core's")
        ours.append(t_ours)
        theirs.append(t_meg)
    print(f"blend order, {a.samples:,} samples over {a.sources} sources (orders equal): "
          f"ours {statistics.median(ours):.2f} s vs megatron-core C++ {statistics.median(theirs):.3f} s")


if __name__ == "__main__":
    main()
