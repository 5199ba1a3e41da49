"""Shared fixtures (a tiny corpus and a sentencepiece model trained on it, once per session) and two session rules:

- GPUs are hidden (``CUDA_VISIBLE_DEVICES=""``, set here before anything imports torch) unless every path given to
  pytest is under tests/gpu: the CPU suite, and every process it starts, stays on the CPU and gloo on a GPU machine.
- ``slow`` marks the tests that start processes: every test whose fixtures include ``spawns`` (or marked by hand). A
  test that starts a process without it fails, naming the process, so ``make test-fast`` (``-m "not slow"``) never
  starts one. docs/testing.md has the fixtures and the rules.
"""
import json
import os
import sys

import pytest

from session_rules import GPU_TESTS, SpawnWatch, only_gpu_tests

GPUS_HIDDEN = not only_gpu_tests(sys.argv[1:])
if GPUS_HIDDEN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

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


# ---- slow: the tests that start processes -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def spawns():
    """Request this in a test or fixture that starts processes: the test is then marked ``slow``."""


@pytest.fixture(scope="session")
def launch(spawns):
    """tests/launching.py's ``launch``: the launcher in a subprocess."""
    from launching import launch
    return launch


@pytest.fixture(scope="session")
def run_distributed(spawns):
    """tests/distributed.py's ``run_distributed``: a function on N spawned ranks joined by a gloo group."""
    from distributed import run_distributed
    return run_distributed


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "spawns" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if GPUS_HIDDEN and GPU_TESTS in item.path.parents:
            item.add_marker(pytest.mark.skip(reason="GPUs are hidden from the CPU suite: run tests/gpu on its own "
                                                    "(make test-gpu)"))


WATCH = SpawnWatch()
WATCH.install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    WATCH.item, WATCH.started = item, []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    WATCH.item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when in ("setup", "call") and WATCH.started:
        started, WATCH.started = WATCH.started, []
        if report.passed:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} started a process but is not marked slow: {started[0]}\n"
                               f"request the `spawns` fixture in the test (or in the fixture that starts it), or mark "
                               f"it @pytest.mark.slow, so that `make test-fast` leaves it out")
