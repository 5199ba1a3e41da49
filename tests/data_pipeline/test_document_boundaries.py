"""Document boundaries per window (cu_seqlens) from the sample index's stream offsets: exact values on a
hand-made stream, and the same boundaries as scanning each window for EOD (the reference) in every stage, across
epochs, for the validation windows and through the loader (also when resumed)."""
import numpy as np
import pytest
import torch

from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.loader import StageLoader
from data_pipeline.samples import GrowLengthSamples, window_cu_seqlens

EOD = 2


def by_eod_scan(windows: np.ndarray) -> list[int]:
    """The reference: a document starts at input t > 0 of a window when input t - 1 is an EOD."""
    n, L = windows.shape[0], windows.shape[1] - 1
    cu = [r * L + t for r in range(n) for t in range(L) if t == 0 or windows[r, t - 1] == EOD]
    return cu + [n * L]


def test_window_cu_seqlens_by_hand():
    doc_starts = np.array([0, 3, 4, 10, 11, 12, 20])  # documents [0,3) [3,4) [4,10) [10,11) [11,12) [12,20)
    cu = window_cu_seqlens(doc_starts, np.array([0, 4, 8, 2]), 4)
    # window [0,4): starts 3 -> 3;  [4,8): none;  [8,12): 10, 11 -> 2, 3;  [2,6): 3, 4 -> 1, 2
    assert cu.dtype == np.int32
    assert cu.tolist() == [0, 3, 4, 8, 10, 11, 12, 13, 14, 16]
    assert window_cu_seqlens(doc_starts, np.array([12]), 8).tolist() == [0, 8]  # a document start at s: row start
    assert window_cu_seqlens(doc_starts, np.array([], dtype=np.int64), 4).tolist() == [0]


@pytest.fixture
def samples(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(4, 300, size=int(n)).tolist() + [EOD] for n in rng.integers(0, 20, size=50)]  # [EOD] too
    total = sum(map(len, docs))
    plan = [(8, 8 * (total // 16)), (16, 16 * (total // 16)), (32, 32 * (total // 32))]  # several epochs
    return GrowLengthSamples(write_dataset(str(tmp_path / "d"), docs), plan, seed=5, valid_fraction=0.2)


def test_boundaries_equal_an_eod_scan_in_every_stage(samples):
    assert samples.num_epochs > 1  # windows cross epoch joins too
    for stage in range(len(samples.stages)):
        idx = np.arange(samples.num_samples(stage))
        for chunk in np.array_split(idx, 7):
            cu = samples.cu_seqlens(stage, chunk)
            assert cu.tolist() == by_eod_scan(samples.samples(stage, chunk))


def test_validation_boundaries_equal_an_eod_scan(samples):
    for L in (4, 16, 33):
        windows = samples.validation.windows(L)
        rows = np.arange(1, len(windows), 3)
        assert samples.validation.cu_seqlens(L, rows).tolist() == by_eod_scan(windows[rows])


def test_loader_yields_each_micro_batch_with_its_boundaries_and_resumes_them(samples):
    stage, mbs, accum, world = 1, 2, 2, 2
    plain = list(StageLoader(samples, stage, mbs, accum, rank=1, world_size=world))
    loader = StageLoader(samples, stage, mbs, accum, rank=1, world_size=world, documents=True)
    with_docs = list(loader)
    assert len(with_docs) == len(plain) > 2
    for step, ref in zip(with_docs, plain):
        for (tokens, cu), ref_tokens in zip(step, ref):
            assert torch.equal(tokens, ref_tokens) and cu.dtype == torch.int32
            assert cu.tolist() == by_eod_scan(tokens.numpy())
    resumed = StageLoader.from_state_dict(samples, {"stage": stage, "consumed_samples": 2 * mbs * accum * world},
                                          mbs, accum, 1, world, documents=True)
    for a, b in zip(resumed, with_docs[2:]):
        assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.cu_seqlens, y.cu_seqlens) for x, y in zip(a, b))
