"""The tokenizer record beside a dataset (PREFIX.tokenizer.json): written by preprocess and merge, checked by merge
and inspect; data and a tokenizer that do not belong together are refused, files already there unchanged."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from data_pipeline import inspect as insp
from data_pipeline import merge as mg
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.preprocess import preprocess
from data_pipeline.provenance import TokenizerIdentity, check_tokenizer, read_identity
from data_pipeline.tokenizer import Tokenizer

EXTS = (".bin", ".idx", ".tokenizer.json")


def snapshot(*prefixes):
    return {p + e: open(p + e, "rb").read() for p in prefixes for e in EXTS if os.path.exists(p + e)}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_jsonl):
    """A byte-level BPE of the same vocabulary size as sp_model (1000) but EOD 0: every id of one fits the other."""
    from data_pipeline.train_tokenizer import train_bytelevel_bpe
    return train_bytelevel_bpe([corpus_jsonl], str(tmp_path_factory.mktemp("bpe") / "bpe"), vocab_size=1000,
                               quiet=True)


def test_preprocess_records_the_tokenizer(tokenized, sp_model):
    record = json.loads(open(tokenized + ".tokenizer.json").read())
    tok = Tokenizer(sp_model)
    assert record["tokenizer"] == {"kind": "sentencepiece", "vocab_size": 1000, "eod_id": 2,
                                   "fingerprint": hashlib.sha256(open(sp_model, "rb").read()).hexdigest()}
    assert record["dataset"] == {"bin_bytes": len(open(tokenized + ".bin", "rb").read()),
                                 "idx_bytes": len(open(tokenized + ".idx", "rb").read())}
    assert read_identity(tokenized) == TokenizerIdentity.of(tok)
    assert check_tokenizer(tokenized, tok, "data.tokenizer") is True
    copy = Tokenizer(tok.save(Path(sp_model).parent / "copy"))  # the run dir's copy
    assert check_tokenizer(tokenized, copy, "data.tokenizer") is True


def test_other_tokenizer_of_the_same_size_is_refused(tokenized, bpe_dir):
    bpe = Tokenizer(bpe_dir)
    assert bpe.vocab_size == 1000 and bpe.eod_id != 2  # the largest-id check cannot see this
    with pytest.raises(DatasetError, match=r"data.tokenizer .*bpe did not make .*corpus: .*corpus.tokenizer.json "
                                           r"records \(sentencepiece, 1,000 ids, EOD 2, .*\) but data.tokenizer is "
                                           r"\(huggingface, 1,000 ids, EOD 0"):
        check_tokenizer(tokenized, bpe, "data.tokenizer")


def test_merge_refuses_two_tokenizers(tmp_path, tokenized, corpus_jsonl, bpe_dir, capsys):
    other = str(tmp_path / "other")
    preprocess([corpus_jsonl], other, bpe_dir, quiet=True)
    out = str(tmp_path / "m")
    write_dataset(out, [[1, 2]])  # an existing output stays as it was
    before = snapshot(tokenized, other, out)
    assert mg.main(["--input", tokenized, other, "--output-prefix", out]) == 2
    err = capsys.readouterr().err
    assert "were made by different tokenizers (sentencepiece, 1,000 ids, EOD 2" in err and "huggingface" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tokenized, other, out) == before


def test_merge_keeps_the_common_record(tmp_path, tokenized, sp_model):
    out = str(tmp_path / "m")
    twin = str(tmp_path / "twin")
    for ext in EXTS:
        shutil.copy(tokenized + ext, twin + ext)
    mg.merge([tokenized, twin], out)
    assert read_identity(out) == TokenizerIdentity.of(Tokenizer(sp_model))
    assert insp.main([out, "--tokenizer-model", sp_model]) == 0


def test_merge_with_an_unrecorded_input_writes_no_record(tmp_path, tokenized, caplog):
    plain = str(tmp_path / "plain")
    for ext in (".bin", ".idx"):
        shutil.copy(tokenized + ext, plain + ext)
    out = str(tmp_path / "m")
    mg.merge([tokenized, plain], out)
    assert read_identity(out) is None and "plain: no tokenizer record (made by another tool) while" in caplog.text


def test_a_build_without_identity_removes_an_old_record(tmp_path, tokenized):
    p = str(tmp_path / "p")
    for ext in EXTS:
        shutil.copy(tokenized + ext, p + ext)
    write_dataset(p, [[5, 6, 2]])  # the record described the old data
    assert read_identity(p) is None


def test_stale_or_damaged_record(tmp_path, tokenized, sp_model, capsys):
    p = str(tmp_path / "p")
    for ext in EXTS:
        shutil.copy(tokenized + ext, p + ext)
    shutil.copy(tokenized + ".bin", p + ".bin")
    with open(p + ".bin", "ab") as f:  # rewritten by a tool that does not know the record
        f.write(b"\0\0")
    with pytest.raises(DatasetError, match=r"p.tokenizer.json: records a dataset of .* but .*p.bin/.idx have .*: "
                                           r"the data was rewritten without it; delete"):
        read_identity(p)
    (tmp_path / "p.tokenizer.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"p.tokenizer.json: not a dataset tokenizer record \(JSONDecodeError"):
        read_identity(p)


def test_inspect_reports_and_checks_the_record(tokenized, sp_model, bpe_dir, tmp_path, capsys):
    assert insp.main([tokenized]) == 0
    assert "tokenizer   sentencepiece, 1,000 ids, EOD 2, sha256 " in capsys.readouterr().out
    assert insp.main([tokenized, "--tokenizer-model", bpe_dir]) == 1
    assert "INVALID: --tokenizer-model " in capsys.readouterr().err
    plain = str(tmp_path / "plain")
    for ext in (".bin", ".idx"):
        shutil.copy(tokenized + ext, plain + ext)
    assert insp.main([plain]) == 0
    assert "tokenizer   not recorded (no " in capsys.readouterr().out


def test_data_files_changed_under_a_reader(tmp_path, tokenized):
    from data_pipeline.provenance import DataFiles
    p = str(tmp_path / "p")
    for ext in EXTS:
        shutil.copy(tokenized + ext, p + ext)
    files = DataFiles(p)
    files.check("at start")  # unchanged: nothing to say
    size = os.path.getsize(p + ".bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DatasetError, match=rf"p\.bin: rewritten in place \({size:,} -> {size - 2:,} bytes\) while "
                                           r"this run reads it \(found before the checkpoint of step 2\)"):
        files.check("before the checkpoint of step 2")
    files = DataFiles(p)
    os.remove(p + ".idx")
    with pytest.raises(DatasetError, match=r"p\.idx: removed while this run reads it \(found now\)"):
        files.check("now")


@pytest.mark.slow
def test_a_bus_error_names_the_mapped_data(tmp_path, tokenized):
    """A read past a truncation (SIGBUS from the memory map) ends the process with one line naming the files."""
    import subprocess
    import sys
    p = str(tmp_path / "p")
    for ext in (".bin", ".idx"):
        shutil.copy(tokenized + ext, p + ext)
    code = (f"import os, numpy as np\nfrom data_pipeline.indexed_dataset import IndexedDataset\n"
            f"from data_pipeline.provenance import DataFiles\nDataFiles({p!r}).name_on_sigbus()\n"
            f"ds = IndexedDataset({p!r})\nos.truncate({p + '.bin'!r}, 0)\nprint(int(np.asarray(ds.tokens).sum()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 135, proc.stderr
    assert proc.stderr.strip() == (f"error: Bus error (SIGBUS) reading memory-mapped data ({p}.bin, {p}.idx): a file "
                                   f"was truncated or rewritten under this run; restore the data the run started "
                                   f"with and resume from the last checkpoint")
