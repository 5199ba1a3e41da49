"""Hugging Face tokenizers: train_tokenizer --type bpe-bytelevel, the Tokenizer over tokenizer.json / HF directories
(EOD = the tokenizer's eos), save, preprocess with the library's batch encoder, and interop with transformers and
megatron-core's own tokenizer tooling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import preprocess as pp
from data_pipeline import train_tokenizer as tt
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_jsonl):
    """A 1000-token byte-level BPE trained on the test corpus (HF tokenizer directory)."""
    return tt.train_bytelevel_bpe([corpus_jsonl], str(tmp_path_factory.mktemp("bpe") / "bpe"), vocab_size=1000,
                                  quiet=True)


def hf_tokenizer_json(path, special_tokens=()):
    """A tiny word-level tokenizer.json written with the tokenizers library, with the given special tokens."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", *special_tokens])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special_tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_bytelevel_bpe_ids_round_trip_and_transformers_agree(bpe_dir, corpus_docs):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(bpe_dir)
    assert (tok.kind, tok.vocab_size, tok.eod_id, tok.bos_id, tok.pad_id) == ("huggingface", 1000, 0, 1, 2)
    assert sorted(os.listdir(bpe_dir)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (0, 1, 2)
    for doc in corpus_docs:
        ids = tok.encode(doc)
        assert ids and not {0, 1, 2} & set(ids)  # no special token added
        assert tok.decode(ids) == doc  # byte-level: every text round-trips
        assert hf(doc).input_ids == ids  # the reference: transformers' own encoding of the same file
    assert tok.encode_batch(corpus_docs, num_threads=2) == [tok.encode(d) for d in corpus_docs]
    assert tok.decode(tok.encode("ǅ ᚠ ꙮ")) == "ǅ ᚠ ꙮ"
    same = Tokenizer(Path(bpe_dir) / "tokenizer.json")  # the file alone reads its config beside it
    assert (same.eod_id, same.vocab_size, same.encode(corpus_docs[0])) == (0, 1000, tok.encode(corpus_docs[0]))


def test_train_cli_is_deterministic_and_refuses_bad_input(bpe_dir, corpus_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")  # main() sets it from --workers; restored after the test
    out = tmp_path / "cli"
    assert tt.main(["--type", "bpe-bytelevel", "--input", corpus_jsonl, "--model-prefix", str(out),
                    "--vocab-size", "1000", "--workers", "1"]) == 0
    assert "byte-level BPE vocab 1000" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == (Path(bpe_dir) / "tokenizer.json").read_bytes()
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert tt.main(["--type", "bpe-bytelevel", "--input", corpus_jsonl, "--model-prefix", str(tmp_path / "s"),
                    "--vocab-size", "258"]) == 2
    assert "--vocab-size 258: too small; a byte-level BPE holds the 256 bytes and 3 special tokens, use at " \
           "least 259" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetError, match=r"--model-prefix .*f: is a file; a byte-level BPE is written as a dir"):
        tt.train_bytelevel_bpe([corpus_jsonl], str(tmp_path / "f"), vocab_size=300, quiet=True)


def test_eos_from_config_or_convention_and_clear_errors(tmp_path):
    # a bare tokenizer.json: the one conventional end-of-text special token is the eos
    bare = hf_tokenizer_json(tmp_path / "bare" / "tokenizer.json", ["<|endoftext|>", "<pad>"])
    assert Tokenizer(bare).eod_id == 3 and Tokenizer(bare).pad_id is None
    # tokenizer_config.json beside it names the eos (string or AddedToken dict), which wins over the convention
    (bare.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"},
                                                                   "pad_token": "<pad>"}))
    assert (Tokenizer(bare.parent).eod_id, Tokenizer(bare.parent).pad_id) == (4, 4)
    (bare.parent / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert Tokenizer(bare.parent).eod_id == 4  # tokenizer_config.json first, as transformers
    (bare.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nope>"}))
    with pytest.raises(DatasetError, match=r"bare: eos_token '</nope>' .* is not in tokenizer\.json; set eos_token"):
        Tokenizer(bare)
    (bare.parent / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"tokenizer_config\.json: not valid JSON .*; fix or delete it"):
        Tokenizer(bare)

    no_eos = hf_tokenizer_json(tmp_path / "noeos" / "tokenizer.json", ["<pad>"])
    with pytest.raises(DatasetError, match=r"noeos/tokenizer\.json: no eos token \(the end-of-document token\): "
                                           r"none of .* write \{\"eos_token\": \"<the token>\"\} to .*noeos/"
                                           r"tokenizer_config\.json"):
        Tokenizer(no_eos)
    (no_eos.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))  # the fix it names
    assert Tokenizer(no_eos).eod_id == 3
    two = hf_tokenizer_json(tmp_path / "two" / "tokenizer.json", ["</s>", "<|endoftext|>"])
    with pytest.raises(DatasetError, match=r"no eos token .*: several of"):
        Tokenizer(two)

    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(DatasetError, match=r"broken\.json: not a Hugging Face tokenizer\.json \(.*\); give a "
                                           r"sentencepiece \.model, a Hugging Face tokenizer\.json or a directory"):
        Tokenizer(tmp_path / "broken.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no tokenizer\.json in this directory \(a Hugging Face "
                                           r"tokenizer directory needs one"):
        Tokenizer(tmp_path / "empty")


def test_directory_with_only_a_sentencepiece_model_points_at_the_file(tmp_path, sp_model):
    d = tmp_path / "sp"
    path = Tokenizer(sp_model).save(d)
    assert path == str(d / "tokenizer.model")
    with pytest.raises(DatasetError, match=r"sp: no tokenizer\.json .*; for a sentencepiece model pass the file "
                                           r"itself \(.*sp/tokenizer\.model\)"):
        Tokenizer(d)


def test_save_makes_a_self_contained_copy(tmp_path, bpe_dir, sp_model, corpus_docs):
    transformers = pytest.importorskip("transformers")
    text = corpus_docs[3]
    for source in (sp_model, bpe_dir, str(Path(bpe_dir) / "tokenizer.json")):
        tok = Tokenizer(source)
        dest = tmp_path / f"copy-{tok.kind}-{Path(source).name}"
        copy = Tokenizer(tok.save(dest))
        assert (copy.kind, copy.vocab_size, copy.eod_id, copy.bos_id, copy.pad_id) == \
            (tok.kind, tok.vocab_size, tok.eod_id, tok.bos_id, tok.pad_id)
        assert copy.encode(text) == tok.encode(text)
        assert not [p for p in os.listdir(dest) if ".tmp-" in p]
        assert Tokenizer(tok.save(dest)).eod_id == tok.eod_id  # saving again over the copy is fine
    # a tokenizer whose eos was found by convention: the copy names it, so transformers agrees
    bare = hf_tokenizer_json(tmp_path / "bare" / "tokenizer.json", ["<|endoftext|>"])
    out = Tokenizer(bare).save(tmp_path / "bare-copy")
    assert json.loads((Path(out) / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == Tokenizer(out).eod_id == 3 and hf("hello world").input_ids == [1, 2]


def preprocess_cli(src, prefix, tokenizer, workers):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAYON_NUM_THREADS", None)
    subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--input", src, "--output-prefix", prefix,
                    "--tokenizer-model", tokenizer, "--workers", str(workers), "--quiet"],
                   check=True, cwd=ROOT, env=env)


def test_preprocess_with_tokenizer_json_is_exact_and_independent_of_workers(spawns, tmp_path, corpus_jsonl, bpe_dir,
                                                                          corpus_docs, monkeypatch):
    """Separate processes, so the library's thread pool really has 1 and 3 threads."""
    one, three = str(tmp_path / "one"), str(tmp_path / "three")
    preprocess_cli(corpus_jsonl, one, bpe_dir, 1)
    preprocess_cli(corpus_jsonl, three, str(Path(bpe_dir) / "tokenizer.json"), 3)
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(three + ext, "rb").read()
    monkeypatch.setattr(pp, "BATCH_BYTES", 10_000)  # many batches: order across batches
    small = str(tmp_path / "small")
    pp.preprocess([corpus_jsonl], small, bpe_dir, quiet=True)
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(small + ext, "rb").read()
    tok, ds = Tokenizer(bpe_dir), IndexedDataset(one)
    assert ds.dtype == np.uint16 and ds.num_documents == len(corpus_docs)
    expected = np.concatenate([tok.encode(d) + [tok.eod_id] for d in corpus_docs])  # one document at a time
    assert np.array_equal(ds.tokens, expected) and tok.eod_id == 0
    from data_pipeline import inspect as insp
    assert insp.main([one, "--tokenizer-model", bpe_dir]) == 0  # every id < its vocabulary, first doc decodes


def test_tokenizer_type_flag_must_match_the_file(tmp_path, corpus_jsonl, bpe_dir, capsys):
    out = str(tmp_path / "o")
    assert pp.main(["--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-model", bpe_dir,
                    "--tokenizer-type", "SentencePieceTokenizer", "--quiet"]) == 2
    assert "--tokenizer-type SentencePieceTokenizer but --tokenizer-model" in capsys.readouterr().err
    assert pp.main(["--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-model", bpe_dir,
                    "--tokenizer-type", "HuggingFaceTokenizer", "--quiet"]) == 0


def test_megatron_tokenizer_tooling_data_reads_and_serves_here(tmp_path, corpus_jsonl, corpus_docs, bpe_dir):
    """megatron-core's own HF tokenizer wrapper and IndexedDatasetBuilder (what Megatron-LM's
    tools/preprocess_data.py runs per document: tokenize, append eod, add_document) -> the launcher's data path."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder as MBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    from launcher.config import from_dict
    from launcher.data import prepare_data
    from launcher.plan import plan_from_config

    mtok = MegatronTokenizer.from_pretrained(bpe_dir, metadata_path={"library": "huggingface"})
    assert mtok.eod == Tokenizer(bpe_dir).eod_id == 0
    meg = str(tmp_path / "meg")
    builder = MBuilder(meg + ".bin", dtype=DType.optimal_dtype(mtok.vocab_size))
    for doc in corpus_docs:
        ids = mtok.tokenize(doc) + [mtok.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(meg + ".idx")
    ours = str(tmp_path / "ours")
    pp.preprocess([corpus_jsonl], ours, bpe_dir, quiet=True)
    for ext in (".bin", ".idx"):  # the same bytes as ours from the same tokenizer
        assert open(meg + ext, "rb").read() == open(ours + ext, "rb").read()
    cfg = from_dict({"run_dir": str(tmp_path / "run"),
                     "data": {"prefix": meg, "tokenizer": bpe_dir, "cache_dir": str(tmp_path / "cache")},
                     "growlength": {"tokens_per_step": 256, "stages": [{"seq_len": 32, "tokens": 1024},
                                                                       {"seq_len": 64, "tokens": 1024}]}})
    data = prepare_data(cfg, rank=0, world=1)
    assert data.tokenizer.eod_id == 0 and data.tokenizer.vocab_size == 1000
    plan = plan_from_config(cfg.growlength, 1)
    from data_pipeline.samples import GrowLengthSamples
    samples = GrowLengthSamples(meg, stages=plan.data_stages(), seed=cfg.seed).build()
    data.samples = samples
    loader = data.loader(plan.stages[1], 0)
    try:
        batch = next(iter(loader))[0]
    finally:
        loader.close()  # its prefetch thread must not outlive the test
    assert batch.shape == (plan.stages[1].micro_batch_size, 65) and int(batch.max()) < 1000
