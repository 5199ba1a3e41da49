"""MMIDIDX v1 read/write: exact contents, megatron-core interop both ways, and every error on damaged files."""
import os
import struct

import numpy as np
import pytest

from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import (HEADER_SIZE, IndexedDataset, IndexedDatasetBuilder, optimal_dtype,
                                           write_dataset)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

DOCS = [[5, 6, 7, 2], [8, 2], [], [9, 10, 11, 12, 2]]


@pytest.fixture
def prefix(tmp_path):
    return write_dataset(str(tmp_path / "ds"), DOCS)


def test_round_trip_exact(prefix):
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 4 and len(ds) == 4 and ds.num_tokens == 11 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert [ds.document(d).tolist() for d in range(4)] == DOCS
    assert ds.get(3, 1, 2).tolist() == [10, 11] and ds.get(0, 2).tolist() == [7, 2]
    assert ds.tokens.tolist() == sum(DOCS, [])
    starts, lengths = ds.document_token_bounds()
    assert starts.tolist() == [0, 4, 6, 6] and lengths.tolist() == [4, 2, 0, 5]


def test_exact_bytes(prefix):
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:HEADER_SIZE]) == (1, 8, 4, 5)
    body = np.frombuffer(raw, np.int32, 4, HEADER_SIZE).tolist()
    assert body == [4, 2, 0, 5]
    assert np.frombuffer(raw, np.int64, 4, HEADER_SIZE + 16).tolist() == [0, 8, 12, 12]
    assert np.frombuffer(raw, np.int64, 5, HEADER_SIZE + 48).tolist() == [0, 1, 2, 3, 4]
    assert len(raw) == HEADER_SIZE + 48 + 40
    assert open(prefix + ".bin", "rb").read() == np.array(sum(DOCS, []), "<u2").tobytes()


def test_multi_sequence_documents_and_int32(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.int32) as b:
        b.add_item([70000, 1]); b.add_item([2]); b.end_document()
        b.add_item([3, 4]); b.end_document()
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2
    assert ds.document(0).tolist() == [70000, 1, 2] and ds.document(1).tolist() == [3, 4]


def test_optimal_dtype():
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32


def test_megatron_reads_ours(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    m = MIndexed(prefix)
    assert len(m) == 4 and m.index.dtype == np.uint16
    assert [m[i].tolist() for i in range(4)] == DOCS
    assert m.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert m.get(3, offset=1, length=2).tolist() == [10, 11]


def test_ours_reads_megatron(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MBuilder
    p = str(tmp_path / "meg")
    b = MBuilder(p + ".bin", dtype=np.uint16)
    for doc in DOCS:
        b.add_item(torch.tensor(doc, dtype=torch.int64))
        b.end_document()
    b.add_document(torch.tensor([1, 2, 3, 2]), [3, 1])  # one document of two sequences
    b.finalize(p + ".idx")
    ds = IndexedDataset(p)
    assert ds.num_documents == 5 and len(ds) == 6
    assert [ds.document(d).tolist() for d in range(4)] == DOCS
    assert ds.document(4).tolist() == [1, 2, 3, 2] and ds[5].tolist() == [2]
    # and our file equals megatron's byte for byte for the same documents
    ours = str(tmp_path / "ours")
    with IndexedDatasetBuilder(ours, np.uint16) as ob:
        for doc in DOCS:
            ob.add_item(doc); ob.end_document()
        ob.add_item([1, 2, 3]); ob.add_item([2]); ob.end_document()
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(p + ext, "rb").read()


def test_builder_abort_leaves_nothing(tmp_path):
    p = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(p) as b:
            b.add_item([1, 2])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_builder_errors(tmp_path, prefix):
    with pytest.raises(DatasetError, match="token id 70000 does not fit uint16; build with dtype=np.int32"):
        IndexedDatasetBuilder(str(tmp_path / "a")).add_item([1, 70000])
    with pytest.raises(DatasetError, match="dtype complex128 has no MMIDIDX code"):
        IndexedDatasetBuilder(str(tmp_path / "b"), np.complex128)
    b = IndexedDatasetBuilder(str(tmp_path / "c"), np.int32)
    with pytest.raises(DatasetError, match=r"ds.idx: dtype uint16 differs from the output's int32"):
        b.add_index(prefix)
    b2 = IndexedDatasetBuilder(str(tmp_path / "d"))
    b2.add_item([1])
    with pytest.raises(DatasetError, match=r"call end_document\(\) before add_index"):
        b2.add_index(prefix)
    with pytest.raises(ValueError, match="lengths sum to 3 but 2 tokens given"):
        b2.add_documents(np.array([1, 2]), [1, 2])
    b.abort(); b2.abort()


def test_index_errors(prefix):
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match="sequence 4 out of range"):
        ds[4]
    with pytest.raises(IndexError, match="document 4 out of range"):
        ds.document(4)


# --- damaged files: each names the file and says how to fix it -------------------------------------------
def _patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.remove(p + ".idx"), r"ds\.idx: file not found; create the dataset"),
    (lambda p: os.remove(p + ".bin"), r"ds\.bin: file not found"),
    (lambda p: _patch(p + ".idx", 0, b"XX"), r"ds\.idx: bad magic .* not a Megatron MMIDIDX index file; re-create"),
    (lambda p: _truncate(p + ".idx", 5), r"ds\.idx: truncated header \(5 bytes, need 34\)"),
    (lambda p: _truncate(p + ".idx", 20), r"ds\.idx: truncated header \(20 bytes, need 34\)"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), r"ds\.idx: unsupported index version 2, expected 1"),
    (lambda p: _patch(p + ".idx", 17, b"\x09"), r"ds\.idx: unknown dtype code 9, expected one of"),
    (lambda p: _truncate(p + ".idx", 100), r"ds\.idx: truncated: 100 bytes, but its header \(4 sequences, 5 "
                                           r"document-index entries\) needs 122"),
    (lambda p: open(p + ".idx", "ab").write(b"\0" * 9), r"ds\.idx: has trailing bytes: 131 bytes"),
    (lambda p: _truncate(p + ".bin", 10), r"ds\.bin: truncated: 10 bytes, but .*ds\.idx describes 11 tokens of "
                                          r"uint16 = 22 bytes"),
    (lambda p: open(p + ".bin", "ab").write(b"\0\0"), r"ds\.bin: longer than its index says: 24 bytes"),
    (lambda p: _patch(p + ".idx", HEADER_SIZE + 4, struct.pack("<i", -1)), r"sequence 1 has negative length -1"),
    (lambda p: _patch(p + ".idx", HEADER_SIZE + 16 + 8, struct.pack("<q", 6)),
     r"sequence 1 points at byte 6, but the lengths before it put it at byte 8 \(sequences must be contiguous\)"),
    (lambda p: _patch(p + ".idx", HEADER_SIZE + 48 + 32, struct.pack("<q", 3)),
     r"document index must run from 0 to the sequence count 4, got 0 \.\. 3"),
    (lambda p: _patch(p + ".idx", HEADER_SIZE + 48 + 8, struct.pack("<q", 3)),
     r"document index decreases at document 1 \(3 -> 2\)"),
    (lambda p: _patch(p + ".idx", 26, struct.pack("<Q", 0)),
     r"has trailing bytes: 122 bytes, but its header \(4 sequences, 0 document-index entries\) needs 82"),
])
def test_damaged_files(prefix, damage, message):
    damage(prefix)
    with pytest.raises(DatasetError, match=message):
        IndexedDataset(prefix)


def test_empty_document_index(tmp_path):
    p = str(tmp_path / "e")
    with open(p + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 0, 0))
    open(p + ".bin", "wb").close()
    with pytest.raises(DatasetError, match=r"e\.idx: document index is empty"):
        IndexedDataset(p)


def test_prefix_with_extension_hint(prefix):
    with pytest.raises(DatasetError, match=r"pass the prefix without the extension"):
        IndexedDataset(prefix + ".bin")


def test_empty_dataset_opens(tmp_path):
    p = write_dataset(str(tmp_path / "empty"), [])
    ds = IndexedDataset(p)
    assert ds.num_documents == 0 and ds.num_tokens == 0 and ds.tokens.size == 0
