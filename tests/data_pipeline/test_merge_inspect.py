"""merge (document boundaries survive) and inspect (report, invariants, exit codes)."""
import numpy as np
import pytest

from data_pipeline import inspect as insp
from data_pipeline import merge as mg
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, write_dataset


def test_merge_round_trip(tmp_path, tokenized, sp_model):
    a = write_dataset(str(tmp_path / "a"), [[5, 6, 2], [7, 2]])
    b = str(tmp_path / "b")
    with IndexedDatasetBuilder(b) as builder:  # a document of two sequences must stay one document
        builder.add_item([8, 9]); builder.add_item([10, 2]); builder.end_document()
        builder.add_item([]); builder.end_document()
    c = write_dataset(str(tmp_path / "c"), [[11, 2]])
    assert mg.main(["--input", a, b, c, "--output-prefix", str(tmp_path / "m")]) == 0
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m.document(d).tolist() for d in range(m.num_documents)] == [[5, 6, 2], [7, 2], [8, 9, 10, 2], [], [11, 2]]
    assert m.document_indices.tolist() == [0, 1, 2, 4, 5, 6] and len(m) == 6
    # merging two halves of a real dataset equals the original byte for byte
    full = IndexedDataset(tokenized)
    n = full.num_documents // 2
    halves = [write_dataset(str(tmp_path / f"h{i}"), [full.document(d) for d in rng])
              for i, rng in enumerate([range(n), range(n, full.num_documents)])]
    mg.merge(halves, str(tmp_path / "whole"))
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "whole") + ext, "rb").read() == open(tokenized + ext, "rb").read()


def test_merge_errors(tmp_path, capsys):
    a = write_dataset(str(tmp_path / "a"), [[1, 2]])
    b = write_dataset(str(tmp_path / "b"), [[1, 2]], np.int32)
    with pytest.raises(DatasetError, match=r"--input: token dtypes differ \(.*a: uint16, .*b: int32\); preprocess"):
        mg.merge([a, b], str(tmp_path / "m"))
    with pytest.raises(DatasetError, match=r"--output-prefix .*a: is also an input"):
        mg.merge([a], a)
    with pytest.raises(DatasetError, match="--input: no datasets given"):
        mg.merge([], str(tmp_path / "m"))
    assert mg.main(["--input", a, str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "missing.idx: file not found" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()


def test_inspect_report_and_ok(tokenized, sp_model, capsys):
    assert insp.main([tokenized, "--tokenizer-model", sp_model]) == 0
    out = capsys.readouterr().out
    assert "dtype uint16" in out and "documents   45" in out and "length histogram" in out
    assert "first document decoded" in out and "OK: all invariants hold (token ids < 1000)" in out


def test_inspect_violations(tmp_path, tokenized, capsys):
    p = write_dataset(str(tmp_path / "v"), [[5, 6, 2], [999, 2]])
    assert insp.main([p, "--vocab-size", "500"]) == 1
    assert "INVALID: " in (err := capsys.readouterr().err) and "token id 999 at token 3 (document 1)" in err
    with pytest.raises(DatasetError, match=r"outside the vocabulary \[0, 500\)"):
        insp.check_token_ids(IndexedDataset(p), 500)
    with open(p + ".bin", "r+b") as f:
        f.truncate(4)
    assert insp.main([p]) == 1
    assert "v.bin: truncated: 4 bytes" in capsys.readouterr().err
    assert insp.main([p, "--tokenizer-model", str(tmp_path / "none.model")]) == 2
    assert "none.model: tokenizer model not found" in capsys.readouterr().err


def test_length_histogram():
    assert insp.length_histogram(np.array([0, 1, 2, 3, 4, 9])) == [(0, 1, 1), (1, 2, 1), (2, 4, 2), (4, 8, 1),
                                                                   (8, 16, 1)]
    assert insp.length_histogram(np.array([], dtype=np.int64)) == []
