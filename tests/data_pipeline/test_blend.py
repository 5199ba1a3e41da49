"""The blend rule: equal to megatron-core's own blending index (its compiled helper), and its shares stay on weight."""
import warnings

import numpy as np
import pytest

from data_pipeline.blend import blend_order, normalise_weights
from data_pipeline.errors import SamplePlanError


def megatron_blend(weights, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()  # BlendedDataset normalises its weights before the helper sees them
    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(source, sample, w, len(w), size, False)
    return source, sample


@pytest.mark.parametrize("weights,size", [
    ([0.7, 0.3], 10_000),
    ([0.5, 0.5], 1_001),            # ties: the first source wins, as in megatron-core
    ([1, 1, 1], 999),
    ([3, 0, 1], 2_000),              # a zero weight is never served
    ([1.0], 17),
    ("random8", 50_000),
    ("random3", 30_000),
])
def test_order_equals_megatron_core(weights, size):
    if isinstance(weights, str):
        n = int(weights[len("random"):])
        weights = np.random.default_rng(n).random(n).tolist()
    ours_src, ours_sample = blend_order(weights, size)
    ref_src, ref_sample = megatron_blend(weights, size)
    np.testing.assert_array_equal(ours_src, ref_src)
    np.testing.assert_array_equal(ours_sample, ref_sample)
    assert ours_src.dtype == np.int16 and ours_sample.dtype == np.int64


def test_running_share_stays_within_one_sample_of_weight():
    w = normalise_weights([5, 2, 2, 1])
    src, sample = blend_order(w, 5_000)
    counts = np.zeros((len(src) + 1, len(w)))
    counts[1:] = np.cumsum(np.eye(len(w))[src], axis=0)
    target = np.arange(len(src) + 1)[:, None] * w[None, :]
    assert np.abs(counts - target).max() <= 1.0
    # sample_in_source counts each source's own samples 0, 1, 2, ... with none skipped or repeated
    for k in range(len(w)):
        np.testing.assert_array_equal(sample[src == k], np.arange((src == k).sum()))


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_bad_weights_refused_with_one_line(weights):
    with pytest.raises(SamplePlanError) as e:
        blend_order(weights, 10)
    assert "\n" not in str(e.value) and "mixture" in str(e.value)
