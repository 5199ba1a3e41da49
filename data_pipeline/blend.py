"""The per-sample order of a data mixture: which source serves each sample, and that source's running count.

`blend_order(weights, size)` is megatron-core BlendedDataset's rule, deterministic and with no seed of its own:
weights are normalised to sum 1, and sample i (t = max(i, 1)) comes from the source with the largest deficit
`weight * t - served` (the first such source on a tie), so each source's running share stays as close to its weight
as the samples allow. The result equals megatron-core's `helpers.build_blending_indices` element for element
(tests/data_pipeline/test_blend.py). Reference: docs/training.md (data mixtures).
"""
from __future__ import annotations

import numpy as np

from data_pipeline.errors import SamplePlanError

_MAX_SOURCES = 1 << 15  # the source index is stored as int16, as megatron-core stores it


def normalise_weights(weights) -> np.ndarray:
    """Weights as float64 summing to 1; refuses empty, negative, non-finite or all-zero weights."""
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or not 0 < len(w) < _MAX_SOURCES:
        raise SamplePlanError(f"mixture: give between 1 and {_MAX_SOURCES - 1} source weights, got {len(w)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise SamplePlanError(f"mixture: weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def blend_order(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source int16[size], sample_in_source int64[size]) for `size` blended samples under `weights`."""
    w = normalise_weights(weights).tolist()
    if size < 0:
        raise SamplePlanError(f"mixture: the number of samples must be >= 0, got {size}")
    source = np.zeros(size, dtype=np.int16)
    served = [0] * len(w)
    _pick_many(w, size, source, served)
    return source, _running_counts(source, len(w))


def _pick_many(w: list[float], size: int, source: np.ndarray, served: list[int]) -> None:
    """The rule step by step in Python floats (IEEE doubles, as megatron-core's C++); `>` keeps the first maximum."""
    n = len(w)
    out = [0] * size
    for i in range(size):
        t = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * t - served[0]
        for k in range(1, n):
            err = w[k] * t - served[k]
            if err > best_err:
                best, best_err = k, err
        out[i] = best
        served[best] += 1
    source[:] = out


def _running_counts(source: np.ndarray, n: int) -> np.ndarray:
    """For each sample, how many samples its source served before it (vectorised)."""
    counts = np.zeros(len(source), dtype=np.int64)
    for k in range(n):
        where = np.flatnonzero(source == k)
        counts[where] = np.arange(len(where), dtype=np.int64)
    return counts
