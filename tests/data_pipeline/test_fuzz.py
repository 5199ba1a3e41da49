"""Property test: corrupted headers, index bodies and truncated files give a clean DatasetError or a dataset that
reads back consistently — never another exception, never garbage."""
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import HEADER_SIZE, IndexedDataset, write_dataset

DOCS = [[5, 6, 7, 2], [8, 2], [], [9, 10, 11, 12, 2], [3] * 9]
# no deadline and no too_slow check: both time the machine, not the code
settings.register_profile("data_pipeline", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid_files(tmp_dir):
    prefix = write_dataset(os.path.join(tmp_dir, "ds"), DOCS)
    return prefix, open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()


def _open_cleanly(prefix):
    """Either a DatasetError, or a dataset whose every document reads and whose structure is consistent."""
    try:
        ds = IndexedDataset(prefix)
    except DatasetError as e:
        assert str(e).startswith(prefix), str(e)  # names the file
        return
    total = 0
    for d in range(ds.num_documents):
        total += ds.document(d).size
    assert total == ds.num_tokens == ds.tokens.size


edits = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6)


@settings(settings.get_profile("data_pipeline"))
@given(edits=edits, cut_idx=st.one_of(st.none(), st.integers(0, 200)), cut_bin=st.one_of(st.none(), st.integers(0, 40)),
       header_only=st.booleans())
def test_corruption_gives_clean_error(tmp_path_factory, edits, cut_idx, cut_bin, header_only):
    tmp = str(tmp_path_factory.mktemp("fuzz"))
    prefix, idx, binary = _valid_files(tmp)
    raw = bytearray(idx)
    for pos, value in edits:
        pos = pos % HEADER_SIZE if header_only else pos % len(raw)
        raw[pos] = value
    if cut_idx is not None:
        raw = raw[:cut_idx]
    with open(prefix + ".idx", "wb") as f:
        f.write(bytes(raw))
    if cut_bin is not None:
        with open(prefix + ".bin", "wb") as f:
            f.write(binary[:cut_bin])
    _open_cleanly(prefix)


@settings(settings.get_profile("data_pipeline"))
@given(counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))
def test_absurd_counts_never_allocate(tmp_path_factory, counts):
    tmp = str(tmp_path_factory.mktemp("counts"))
    prefix, idx, _ = _valid_files(tmp)
    raw = bytearray(idx)
    raw[18:34] = np.array(counts, dtype="<u8").tobytes()
    with open(prefix + ".idx", "wb") as f:
        f.write(bytes(raw))
    _open_cleanly(prefix)
