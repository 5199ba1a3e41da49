"""Tokenizer conventions and train_tokenizer."""

import pytest

from data_pipeline import train_tokenizer as tt
from data_pipeline.errors import DatasetError
from data_pipeline.tokenizer import Tokenizer


def test_special_ids_and_round_trip(sp_model, corpus_docs):
    tok = Tokenizer(sp_model)
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert tok.eod_id == sp.eos_id() == 2 and tok.vocab_size == 1000 and tok.path == sp_model
    assert (tok.kind, tok.bos_id, tok.pad_id) == ("sentencepiece", 1, 3)
    for doc in corpus_docs:
        ids = tok.encode(doc)
        assert ids and 1 not in ids and 2 not in ids  # no BOS/EOS added
        assert tok.decode(ids) == doc
    assert tok.encode_batch(corpus_docs[:5], num_threads=2) == [tok.encode(d) for d in corpus_docs[:5]]
    assert [a.tolist() for a in tok.encode_batch_numpy(corpus_docs[:5], 2)] == tok.encode_batch(corpus_docs[:5])
    # byte fallback: characters never seen in training still round-trip
    assert tok.decode(tok.encode("ǅ ᚠ ꙮ")) == "ǅ ᚠ ꙮ" and 0 not in tok.encode("ǅ ᚠ ꙮ")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.model: tokenizer model not found; train one with"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DatasetError, match=r"bad\.model: neither a sentencepiece model nor a Hugging Face "
                                           r"tokenizer\.json .*; give a sentencepiece \.model"):
        Tokenizer(str(bad))


def test_eod_is_the_models_eos_and_a_model_without_eos_is_refused(tmp_path):
    import sentencepiece as spm
    lines = [f"line {i} of some text about tokenizers" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "w"), vocab_size=300,
                                   byte_fallback=True, eos_id=3, pad_id=2, minloglevel=2)
    tok = Tokenizer(str(tmp_path / "w.model"))
    assert (tok.eod_id, tok.pad_id, tok.sp.id_to_piece(tok.eod_id)) == (3, 2, "</s>")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "n"), vocab_size=300,
                                   byte_fallback=True, eos_id=-1, minloglevel=2)
    with pytest.raises(DatasetError, match=r"n\.model: this sentencepiece model has no eos token \(eos_id -1\).*"
                                           r"train it with an eos"):
        Tokenizer(str(tmp_path / "n.model"))


def test_vocab_too_small_for_characters(tmp_path, corpus_jsonl):
    with pytest.raises(DatasetError, match=r"--vocab-size 300: too small for this corpus's characters .* raise "
                                           r"--vocab-size or lower --character-coverage"):
        tt.train_tokenizer([corpus_jsonl], str(tmp_path / "t"), vocab_size=300, character_coverage=1.0, quiet=True)


def test_train_cli_txt_and_errors(tmp_path, capsys):
    txt = tmp_path / "c.txt"
    txt.write_text("".join(f"line {i} of some text about tokenizers and bytes\n" for i in range(300)))
    assert tt.main(["--input", str(txt), "--model-prefix", str(tmp_path / "t"), "--vocab-size", "300",
                    "--quiet"]) == 0
    assert Tokenizer(str(tmp_path / "t.model")).vocab_size == 300 and (tmp_path / "t.vocab").exists()
    assert tt.main(["--input", str(txt), "--model-prefix", str(tmp_path / "u"), "--vocab-size", "100"]) == 2
    assert "--vocab-size 100: too small" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"--vocab-size 5000: too large for this corpus .* lower --vocab-size"):
        tt.train_tokenizer([str(txt)], str(tmp_path / "v"), vocab_size=5000, quiet=True)
    assert tt.main(["--input", str(txt), "--model-prefix", "x", "--json-keys", "a", "b"]) == 2
    assert "give one key" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"--input .*nope\.jsonl: file not found"):
        tt.train_tokenizer([str(tmp_path / "nope.jsonl")], str(tmp_path / "w"))
    (tmp_path / "c.csv").write_text("a,b")
    with pytest.raises(DatasetError, match=r"c\.csv: unsupported file type; use \.jsonl/\.json"):
        tt.train_tokenizer([str(tmp_path / "c.csv")], str(tmp_path / "w"))
    with pytest.raises(DatasetError, match="--input: no input files given"):
        tt.train_tokenizer([], str(tmp_path / "w"))
    with pytest.raises(SystemExit):
        tt.main(["--help"])
