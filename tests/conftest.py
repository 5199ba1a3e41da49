"""Shared fixtures: a tiny corpus and a sentencepiece model trained on it (once per session)."""
import json

import pytest

# hand-written edge cases that a tokenizer round trip must survive
EDGE_DOCS = [
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\n\nand a blank line",
    "unicode: ünïcödé, 日本語, emoji 🙂, math ∑∫",
    "digits 1234567890 and punctuation !?.,;:()[]{}",
    "x",
]


@pytest.fixture(scope="session")
def corpus_docs():
    """~250 KB of real English (pydoc topics, sorted) plus edge cases: a list of document strings."""
    from pydoc_data.topics import topics
    docs = [topics[k].strip() for k in sorted(topics)][:40]
    return docs + EDGE_DOCS


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_docs):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in corpus_docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpus_jsonl):
    """A 1000-piece BPE sentencepiece model with the project's special ids, trained once per session."""
    from data_pipeline.train_tokenizer import train_tokenizer
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([corpus_jsonl], str(prefix), vocab_size=1000, num_threads=2, quiet=True)


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, corpus_jsonl, sp_model):
    """The corpus preprocessed with 2 workers: its prefix."""
    from data_pipeline.preprocess import preprocess
    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    preprocess([corpus_jsonl], prefix, sp_model, workers=2, quiet=True)
    return prefix


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Every test starts and ends with torch's default dtype and no process group (a test that fails half-way
    must not leak either into the next)."""
    import torch
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
