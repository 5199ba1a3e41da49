"""The built-in corpus and the one-call dataset the demo and the launcher use."""
import json
import os

from data_pipeline.builtin_corpus import prepare_builtin_dataset
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.tokenizer import Tokenizer


def test_prepare_builtin_dataset_is_complete_and_idempotent(tmp_path):
    out = str(tmp_path / "builtin")
    model, prefix = prepare_builtin_dataset(out, vocab_size=2000)
    tok, ds = Tokenizer(model), IndexedDataset(prefix)
    docs = [json.loads(line)["text"] for line in open(os.path.join(out, "builtin.jsonl"), encoding="utf-8")]
    assert tok.vocab_size == 2000 and ds.num_documents == len(docs) > 500
    assert sum(map(len, docs)) > 2_000_000  # ~2.2 MB of English on CPython 3.11
    assert tok.decode(ds.document(0)[:-1]) == docs[0] and tok.decode(ds.document(len(docs) - 1)[:-1]) == docs[-1]
    stamps = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert prepare_builtin_dataset(out, vocab_size=2000) == (model, prefix)
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == stamps  # nothing rebuilt
    assert not [f for f in os.listdir(out) if ".tmp" in f]
