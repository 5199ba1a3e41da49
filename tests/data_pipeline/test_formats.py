"""Input formats besides .jsonl (issue 21): .parquet, .arrow, `datasets` save_to_disk directories, .jsonl.zst /
.json.zst / .txt.zst, and directories/globs of shards. Each gives the .jsonl path's output byte for byte for the
same texts and any worker count; a bad row is FILE:ROW (or skipped and counted); a truncated or corrupt file is one
line with exit 2 and leaves the existing output unchanged; Parquet is read by record batches."""
import json
import os
import re
import sys

import pytest

pa = pytest.importorskip("pyarrow")  # in .[dev]; skipped only outside the project's test environment
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

from data_pipeline import arrow_corpus  # noqa: E402
from data_pipeline import preprocess as pp  # noqa: E402
from data_pipeline import train_tokenizer as tt  # noqa: E402
from data_pipeline.corpus import ReadStats, check_inputs, iter_documents  # noqa: E402
from data_pipeline.errors import DatasetError  # noqa: E402


def one_line_error(rc, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(directory):
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, f))}


def write_parquet(path, texts, row_group_size=7, **columns):
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)
    return str(path)


def write_zst(path, data: bytes, frames=3):
    """`frames` independent zstd frames one after another (what pzstd and chunked writers produce)."""
    cut = [len(data) * i // frames for i in range(frames + 1)]
    with open(path, "wb") as f:
        for a, b in zip(cut, cut[1:]):
            f.write(zstandard.ZstdCompressor(level=3).compress(data[a:b]))
    return str(path)


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()


def save_datasets_dir(path, texts, shards=3):
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(path),
                                                                                           num_shards=shards)
    return str(path)


FORMATS = {
    "parquet": lambda d, t: write_parquet(d / "c.parquet", t),
    "parquet-dictionary": lambda d, t: str(pq.write_table(pa.table({"text": pa.array(t).dictionary_encode()}),
                                                          d / "c.parquet", row_group_size=9) or d / "c.parquet"),
    "jsonl.zst": lambda d, t: write_zst(d / "c.jsonl.zst", jsonl_bytes(t)),
    "json.zst": lambda d, t: write_zst(d / "c.json.zst", jsonl_bytes(t), frames=1),
    "datasets-dir": lambda d, t: save_datasets_dir(d / "ds", t),
    "arrow-file": lambda d, t: _arrow_ipc_file(d / "c.arrow", t),
    # shards: a directory of Parquet files (nested, as FineWeb's data/CC-MAIN-*/), and a quoted glob of .zst files
    "parquet-dir": lambda d, t: (os.makedirs(d / "pq" / "b"), write_parquet(d / "pq" / "a.parquet", t[:20]),
                                 write_parquet(d / "pq" / "b" / "000.parquet", t[20:30]),
                                 write_parquet(d / "pq" / "b" / "001.parquet", t[30:]), str(d / "pq"))[-1],
    "zst-glob": lambda d, t: (write_zst(d / "s-00.jsonl.zst", jsonl_bytes(t[:25])),
                              write_zst(d / "s-01.jsonl.zst", jsonl_bytes(t[25:])), str(d / "s-*.jsonl.zst"))[-1],
}


def _arrow_ipc_file(path, texts):
    table = pa.table({"text": texts})
    with pa.ipc.new_file(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=11):
            w.write_batch(batch)
    return str(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_equals_the_jsonl_path_byte_for_byte(tmp_path, fmt, corpus_docs, sp_model, tokenized,
                                                         monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 10_000)  # many encode batches
    monkeypatch.setattr(arrow_corpus, "BATCH_ROWS", 5)  # many record batches
    src = FORMATS[fmt](tmp_path, corpus_docs)
    assert list(iter_documents(check_inputs([src]))) == corpus_docs
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        summary = pp.preprocess([src], out, sp_model, workers=workers, quiet=True)
        assert summary.documents == len(corpus_docs)
        for ext in (".bin", ".idx"):
            assert open(out + ext, "rb").read() == open(tokenized + ext, "rb").read(), (fmt, workers, ext)


def test_directory_order_and_datasets_dirs_inside_it(tmp_path):
    """Shards are read in sorted path order; a `datasets` directory inside a directory is one source."""
    write_parquet(tmp_path / "b.parquet", ["b0", "b1"])
    write_zst(tmp_path / "a.jsonl.zst", jsonl_bytes(["a0"]), frames=1)
    save_datasets_dir(tmp_path / "c", ["c0", "c1", "c2"], shards=2)
    (tmp_path / "README.md").write_text("not an input")
    sources = check_inputs([str(tmp_path)])
    assert [os.path.relpath(s, tmp_path) for s in sources] == ["a.jsonl.zst", "b.parquet", "c"]
    assert list(iter_documents(sources)) == ["a0", "b0", "b1", "c0", "c1", "c2"]


def test_train_tokenizer_from_parquet_equals_jsonl(tmp_path, corpus_jsonl, corpus_docs, sp_model):
    src = write_parquet(tmp_path / "c.parquet", corpus_docs)
    path = tt.train_tokenizer([src], str(tmp_path / "tok"), vocab_size=1000, num_threads=2, quiet=True)
    assert open(path, "rb").read() == open(sp_model, "rb").read()
    assert tt.main(["--input", str(tmp_path / "*.parquet"), "--type", "bpe-bytelevel", "--model-prefix",
                    str(tmp_path / "bpe"), "--vocab-size", "300", "--quiet"]) == 0


# --- bad rows ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, where, reason", [
    (lambda d: write_parquet(d / "c.parquet", ["a", "b", None, "d"], row_group_size=2), "c.parquet:3",
     "column 'text' is null"),
    (lambda d: save_datasets_dir(d / "ds", ["a", None, "c", "d"], shards=2), "ds/data-00000-of-00002.arrow:2",
     "column 'text' is null"),
    (lambda d: write_zst(d / "c.jsonl.zst", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n{"text": "d"}\n'),
     "c.jsonl.zst:2", "invalid JSON"),
    (lambda d: write_parquet(d / "c.parquet", ["a", "b", "c", "d"], row_group_size=2,
                             bad=[1, 2, 3, 4]) and _with_invalid_utf8(d / "c.parquet", 3), "c.parquet:3",
     "undecodable bytes"),
])
def test_bad_row_is_file_row_or_skipped_and_counted(tmp_path, sp_model, capsys, make, where, reason):
    src = make(tmp_path)
    before = snapshot(tmp_path)
    out = str(tmp_path / "out")
    one_line_error(pp.main(["--input", src, "--output-prefix", out, "--tokenizer-model", sp_model,
                            "--no-progress"]), capsys.readouterr().err,
                   rf"{re.escape(where)}: {reason}.*pass --skip-bad-lines")
    assert snapshot(tmp_path) == before  # nothing written
    assert pp.main(["--input", src, "--output-prefix", out, "--tokenizer-model", sp_model, "--no-progress",
                    "--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert "3 documents" in err and "1 bad lines" in err and f"skipped: {tmp_path}/{where}: {reason}" in err


def _with_invalid_utf8(path, row):
    """Rewrite the Parquet file with row `row` (from 1) of column text holding bytes that are not UTF-8, typed as
    a string column (what a broken writer produces; pyarrow's own builders refuse it)."""
    texts = [t.encode() for t in pq.read_table(path).column("text").to_pylist()]
    texts[row - 1] = b"bad \xff\xfe byte"
    offsets = [0]
    for t in texts:
        offsets.append(offsets[-1] + len(t))
    arr = pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(pa.array(offsets, pa.int32())
                                                                             .buffers()[1]),
                                                          pa.py_buffer(b"".join(texts))])
    pq.write_table(pa.table({"text": arr}), path, row_group_size=2)
    return str(path)


# --- whole-file faults ------------------------------------------------------------------------------------------
def _parquet_truncated(d):
    p = write_parquet(d / "c.parquet", [f"doc {i} " * 50 for i in range(200)], row_group_size=50)
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) - 300])
    return p


def _parquet_corrupt_page(d):
    p = str(d / "c.parquet")
    pq.write_table(pa.table({"text": [f"doc {i} " * 50 for i in range(200)]}), p, row_group_size=50,
                   use_dictionary=False, compression="zstd")
    data = bytearray(open(p, "rb").read())
    meta = pq.ParquetFile(p).metadata.row_group(2).column(0)
    start = meta.data_page_offset
    end = start + meta.total_compressed_size
    data[end - 300: end - 200] = bytes(100)  # inside the third row group's compressed data (after the page header)
    open(p, "wb").write(bytes(data))
    return p


def _zst_truncated(d):
    p = write_zst(d / "c.jsonl.zst", jsonl_bytes([f"doc {i} " * 50 for i in range(200)]), frames=2)
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) - 50])
    return p


def _arrow_shard_truncated(d):
    p = save_datasets_dir(d / "ds", [f"doc {i} " * 50 for i in range(200)], shards=2)
    shard = os.path.join(p, "data-00001-of-00002.arrow")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:len(data) // 2])
    return p


@pytest.mark.parametrize("make, pattern", [
    (_parquet_truncated, r"c\.parquet: truncated, corrupt or not Parquet data at its start \(.*\); the file is "
                         r"incomplete: download or write it again"),
    (_parquet_corrupt_page, r"c\.parquet: truncated, corrupt or not Parquet data after row 100 "),
    (lambda d: ((d / "c.parquet").write_text('{"text": "json"}\n'), str(d / "c.parquet"))[-1],
     r"c\.parquet: truncated, corrupt or not Parquet data at its start"),
    (_zst_truncated, r"c\.jsonl\.zst: truncated or corrupt zstd data after line \d+ \(the file ends inside a zstd "
                     r"frame\); the file is incomplete"),
    (lambda d: ((d / "c.jsonl.zst").write_text('{"text": "plain"}\n'), str(d / "c.jsonl.zst"))[-1],
     r"c\.jsonl\.zst: not a zstd file \(.*\); rename it without \.zst if it is plain text"),
    (_arrow_shard_truncated, r"data-00001-of-00002\.arrow: truncated, corrupt or not Arrow data at its start "
                             r"\(Expected to be able to read \d+ bytes for message body, got \d+\)"),
    (lambda d: (pq.write_table(pa.table({"body": ["b"]}), d / "c.parquet"), str(d / "c.parquet"))[-1],
     r"c\.parquet: no column 'text' \(columns: \['body'\]\); name the text column with --json-keys"),
    (lambda d: (pq.write_table(pa.table({"text": [1]}), d / "c.parquet"), str(d / "c.parquet"))[-1], r"c\.parquet: column 'text' holds int64, not text; name the text column"),
    (lambda d: datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                                     "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(
        str(d / "dd")) or str(d / "dd"),
     r"--input .*dd: a `datasets` DatasetDict with splits \['test', 'train'\]; pass one split, e\.g\. .*dd/test"),
    (lambda d: str(d / "nothing-*.parquet"), r"--input .*nothing-\*\.parquet: no file matches this pattern"),
    (lambda d: (os.makedirs(d / "ds"), (d / "ds" / "state.json").write_text("{}"),
                (d / "ds" / "dataset_info.json").write_text("{}"), str(d / "ds"))[-1],
     r"--input .*ds: .*state\.json is not a `datasets` state file \('_data_files'\); save the dataset again"),
])
def test_truncated_corrupt_or_unusable_file_is_one_line(tmp_path, sp_model, capsys, make, pattern):
    src = make(tmp_path)
    existing = str(tmp_path / "out")
    (tmp_path / "keep.txt").write_text("an existing dataset\n")
    pp.preprocess([str(tmp_path / "keep.txt")], existing, sp_model, quiet=True)
    before = snapshot(tmp_path)
    for skip in ([], ["--skip-bad-lines"]):  # a broken file is never a skippable row
        one_line_error(pp.main(["--input", src, "--output-prefix", existing, "--tokenizer-model", sp_model,
                                "--no-progress"] + skip), capsys.readouterr().err, pattern)
        assert snapshot(tmp_path) == before


def test_failed_run_keeps_the_existing_output(tmp_path, sp_model, capsys):
    good = write_parquet(tmp_path / "good.parquet", ["keep", "me"])
    out = str(tmp_path / "out")
    pp.preprocess([good], out, sp_model, quiet=True)
    before = snapshot(tmp_path)
    bad = _zst_truncated(tmp_path)
    before[os.path.basename(bad)] = open(bad, "rb").read()
    assert pp.main(["--input", good, bad, "--output-prefix", out, "--tokenizer-model", sp_model,
                    "--no-progress"]) == 2
    assert snapshot(tmp_path) == before


def test_missing_reader_names_the_extra(tmp_path, monkeypatch, capsys, sp_model):
    src = write_parquet(tmp_path / "c.parquet", ["a"])
    zst = write_zst(tmp_path / "c.jsonl.zst", b'{"text": "a"}\n', frames=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DatasetError, match=r"--input .*c\.parquet: reading Parquet/Arrow data needs pyarrow, which "
                                           r"is not installed; pip install 'growlength\[formats\]'"):
        check_inputs([src])
    one_line_error(pp.main(["--input", zst, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", sp_model]),
                   capsys.readouterr().err, r"c\.jsonl\.zst: reading \.zst files needs zstandard, which is not "
                                            r"installed; pip install 'growlength\[formats\]'")


def test_parquet_is_read_by_record_batches_not_whole(tmp_path, monkeypatch):
    """Reading a ~24 MB Parquet file never holds more than a few row groups in Arrow memory."""
    texts = [f"{i:08d} " + "lorem ipsum dolor sit amet " * 40 for i in range(20_000)]  # ~22 MB of text
    src = str(tmp_path / "big.parquet")
    pq.write_table(pa.table({"text": texts}), src, row_group_size=1000, compression="none")  # ~1.1 MB per group
    assert os.path.getsize(src) > 20e6
    peak, n = 0, 0
    for n, _ in enumerate(iter_documents([src], stats=ReadStats()), 1):
        if n % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert n == len(texts)
    assert 0 < peak < 5e6, peak  # the whole column would be > 22 MB
