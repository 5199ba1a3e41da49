"""evaluate's windows over a separate corpus (--split all): the corpus's documents in their own order, as one stream,
cut into whole windows that share one token; checked against a hand-made array."""
import numpy as np
import pytest

from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import write_dataset
from evidence.evaluate import ValidationWindows


def test_split_all_windows_follow_the_documents_in_order(tmp_path):
    docs = [[10, 11, 12, 2], [20, 21, 2], [30, 31, 32, 33, 34, 2]]
    prefix = write_dataset(str(tmp_path / "c"), docs)
    stream = np.array([t for d in docs for t in d])                   # 13 tokens
    w = ValidationWindows(prefix, "all", None)
    assert w.tokens_available == 13
    got = w.windows(4, max_windows=10)                                 # (13 - 1) // 4 = 3 windows of 5
    want = np.stack([stream[i * 4: i * 4 + 5] for i in range(3)])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert np.array_equal(w.windows(4, max_windows=2), want[:2])
    with pytest.raises(DatasetError, match="fewer than one window of seq_len 13"):
        w.windows(13, max_windows=1)
