"""preprocess: round trip, workers-independence, bad lines, empty documents, atomic output, CLI flags."""
import gzip
import json
import os

import numpy as np
import pytest

from data_pipeline import preprocess as pp
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.tokenizer import Tokenizer


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_round_trip_decode_equals_input(tokenized, sp_model, corpus_docs):
    ds, tok = IndexedDataset(tokenized), Tokenizer(sp_model)
    assert ds.num_documents == len(corpus_docs) and ds.dtype == np.uint16
    for d, doc in enumerate(corpus_docs):
        tokens = ds.document(d)
        assert tokens[-1] == tok.eod_id and tok.eod_id not in tokens[:-1]
        assert tok.decode(tokens[:-1]) == doc


def test_one_worker_equals_two_byte_for_byte(tmp_path, corpus_jsonl, sp_model, tokenized, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_BYTES", 10_000)  # many batches, so ordering across batches is exercised
    one = str(tmp_path / "one")
    s = pp.preprocess([corpus_jsonl], one, sp_model, workers=1, quiet=True)
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(tokenized + ext, "rb").read()
    assert s.documents == IndexedDataset(one).num_documents and s.tokens == IndexedDataset(one).num_tokens


def test_cli_summary_empty_docs_txt_gz_and_no_eod(tmp_path, sp_model, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "  \n "}, "",
                                             {"text": "bye"}])
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("first line doc\n\nsecond line doc\n")
    out = str(tmp_path / "out")
    assert pp.main(["--input", src, str(tmp_path / "b.txt.gz"), "--output-prefix", out, "--tokenizer-model",
                    sp_model, "--workers", "2", "--no-progress", "--tokenizer-type", "GPTSentencePieceTokenizer",
                    "--append-eod", "--log-interval", "100"]) == 0
    err = capsys.readouterr().err
    assert "4 documents" in err and "skipped 4 empty documents and 0 bad lines" in err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.txt.gz", "out.bin", "out.idx", "out.tokenizer.json"]  # exactly these
    tok, ds = Tokenizer(sp_model), IndexedDataset(out)
    assert [tok.decode(ds.document(d)[:-1]) for d in range(4)] == ["hello world", "bye", "first line doc",
                                                                   "second line doc"]
    noeod = str(tmp_path / "noeod")
    pp.preprocess([src], noeod, sp_model, append_eod=False, quiet=True)
    assert IndexedDataset(noeod).document(0).tolist() == tok.encode("hello world")


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"bad\.jsonl:2: invalid JSON \(Expecting ',' delimiter at column 14\); fix the line or pass "
                      r"--skip-bad-lines"),
    ('{"body": "x"}', r"bad\.jsonl:2: key 'text' missing \(keys: \['body'\]\); choose the key with --json-keys"),
    ('{"text": 5}', r"bad\.jsonl:2: key 'text' holds int, expected a string"),
    ('["text"]', r"bad\.jsonl:2: expected a JSON object, got list"),
])
def test_bad_lines_name_file_and_line(tmp_path, sp_model, line, message):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line, {"text": "also fine"}])
    out = str(tmp_path / "out")
    with pytest.raises(DatasetError, match=message):
        pp.preprocess([src], out, sp_model, quiet=True)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing half-written, no temp files
    s = pp.preprocess([src], out, sp_model, skip_bad_lines=True, quiet=True)
    assert (s.documents, s.bad_lines) == (2, 1)


def test_undecodable_bytes(tmp_path, sp_model, capsys):
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"u\.jsonl:2: undecodable bytes at column 14 \(invalid continuation "
                                           r"byte\); the input must be UTF-8"):
        pp.preprocess([str(src)], str(tmp_path / "o"), sp_model, quiet=True)
    assert pp.main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", sp_model,
                    "--skip-bad-lines", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 documents" in err and "1 bad lines" in err and "skipped: " in err and "u.jsonl:2" in err


def test_interrupt_leaves_no_output(tmp_path, sp_model, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    monkeypatch.setattr(pp, "BATCH_DOCS", 10)
    calls = {"n": 0}
    real = Tokenizer.encode_batch_numpy

    def interrupted(self, texts, num_threads=1):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, texts, num_threads)
    monkeypatch.setattr(Tokenizer, "encode_batch_numpy", interrupted)
    assert pp.main(["--input", src, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", sp_model,
                    "--no-progress"]) == 130
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer: not supported; use one of"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer but --tokenizer-model"),
    (["--json-keys", "text", "title"], "--json-keys ['text', 'title']: give exactly one key"),
    (["--split-sentences"], "--split-sentences: not supported"),
    (["--partitions", "4"], "--partitions 4: not supported; shard the input yourself"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
])
def test_cli_errors(tmp_path, sp_model, corpus_jsonl, capsys, extra, message):
    argv = ["--input", corpus_jsonl, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", sp_model] + extra
    assert pp.main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_tokenizer(tmp_path, corpus_jsonl):
    with pytest.raises(DatasetError, match=r"nope\.model: tokenizer model not found"):
        pp.preprocess([corpus_jsonl], str(tmp_path / "o"), str(tmp_path / "nope.model"), quiet=True)


def test_overwrites_existing_output_atomically(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    out = str(tmp_path / "out")
    pp.preprocess([src], out, sp_model, quiet=True)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    pp.preprocess([src], out, sp_model, quiet=True, progress=True)
    assert IndexedDataset(out).num_documents == 2
