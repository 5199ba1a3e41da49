"""The built-in corpus: real English that every Python installation carries (pydoc topics, then the standard
library's docstrings, in a fixed order), so the demo needs no download. `prepare_builtin_dataset` prepares its
tokenizer and dataset once and rebuilds either when it no longer opens.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import sys
import sysconfig
import warnings

from data_pipeline.atomic import atomic_path, remove_quietly
from data_pipeline.errors import DatasetError
from data_pipeline.files import make_parent_dir, os_error

log = logging.getLogger(__name__)

MIN_DOC_CHARS = 20  # shorter docstrings ("Return self.") are noise, not language
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def _docstrings(path: str):
    try:
        with open(path, "rb") as f:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # source order (ast.walk is breadth-first)
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_DOC_CHARS:
            yield doc


def iter_builtin_documents():
    """Yield the corpus documents (str) in their fixed order."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name].strip()
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py"))
    for rel in sorted(files):
        doc = "\n\n".join(_docstrings(os.path.join(root, rel)))
        if doc:
            yield doc


def _file_docstrings(path: str) -> str:
    return "\n\n".join(_docstrings(path))


def iter_installed_documents(max_chars: int, workers: int | None = None):
    """Yield documents (str), one per module, from the docstrings of every installed Python package (the
    site-packages directories, then the standard library) in a fixed order, until ``max_chars`` characters: a
    larger offline corpus than the built-in one (tens of MB on a CUDA image), parsed by ``workers`` processes."""
    import multiprocessing
    roots = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                       *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))])
             if os.path.isdir(p)] + [sysconfig.get_paths()["stdlib"]]
    files = []
    for root in roots:  # a site-packages directory is a root of its own, never walked into from the stdlib
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
        files.extend(sorted(found))
    chars = 0
    with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
        for doc in pool.imap(_file_docstrings, files, chunksize=32):
            if doc:
                yield doc
                chars += len(doc)
                if chars >= max_chars:
                    pool.terminate()
                    return


def write_installed_corpus(path: str, max_chars: int, workers: int | None = None) -> str:
    """Write :func:`iter_installed_documents` as JSONL ({"text": ...} per line), atomically. Returns `path`."""
    make_parent_dir(path, "installed-packages corpus")
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_installed_documents(max_chars, workers):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    except OSError as e:
        raise os_error(e.filename or path, e) from None
    return path


def write_builtin_corpus(path: str) -> str:
    """Write the corpus as JSONL ({"text": ...} per line), atomically. Returns `path`."""
    make_parent_dir(path, "built-in corpus")
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_builtin_documents():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    except OSError as e:
        raise os_error(e.filename or path, e) from None
    return path


def prepare_builtin_dataset(out_dir: str, vocab_size: int = 8192, workers: int | None = None,
                            quiet: bool = True) -> tuple[str, str]:
    """Train a tokenizer on the built-in corpus and preprocess it, once: (tokenizer_model_path, data_prefix).

    Idempotent: complete outputs from an earlier call are reused (each is written under a temporary name and
    renamed, so a present file is a complete one); a tokenizer or dataset that no longer opens (damaged or
    tampered with) is rebuilt, with a warning. Files: OUT_DIR/builtin.jsonl, OUT_DIR/tokenizer-V.model,
    OUT_DIR/builtin-V.{bin,idx} with V the vocabulary size. Under a minute on 2 cores.
    """
    from data_pipeline.indexed_dataset import IndexedDataset
    from data_pipeline.preprocess import preprocess
    from data_pipeline.tokenizer import Tokenizer
    from data_pipeline.train_tokenizer import train_tokenizer

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DatasetError(f"built-in dataset directory {out_dir}: is a file; choose another directory "
                           f"(data.builtin_dir)")
    make_parent_dir(os.path.join(out_dir, "builtin.jsonl"), "built-in dataset directory")
    corpus = os.path.join(out_dir, "builtin.jsonl")
    model_prefix = os.path.join(out_dir, f"tokenizer-{vocab_size}")
    data_prefix = os.path.join(out_dir, f"builtin-{vocab_size}")
    model = f"{model_prefix}.model"
    _drop_if_damaged([model], lambda: Tokenizer(model))
    _drop_if_damaged([data_prefix + ".bin", data_prefix + ".idx"], lambda: IndexedDataset(data_prefix))
    if not os.path.isfile(corpus):
        write_builtin_corpus(corpus)
    if not os.path.isfile(model):
        # 200k sampled lines keep training well under a minute on 2 cores and lose little at this vocab size
        train_tokenizer([corpus], model_prefix, vocab_size=vocab_size, input_sentence_size=200_000,
                        num_threads=workers, quiet=quiet)
        for suffix in (".bin", ".idx"):  # a new tokenizer invalidates any old tokens
            if os.path.exists(data_prefix + suffix):
                os.remove(data_prefix + suffix)
    if not (os.path.isfile(data_prefix + ".bin") and os.path.isfile(data_prefix + ".idx")):
        preprocess([corpus], data_prefix, model, workers=workers or os.cpu_count() or 1, progress=not quiet,
                   quiet=quiet)
    IndexedDataset(data_prefix)  # raises if something on disk is damaged
    return model, data_prefix


def _drop_if_damaged(paths: list[str], open_them) -> None:
    """Remove derived files that exist but do not open, so that they are built again."""
    if not any(os.path.exists(p) for p in paths):
        return
    try:
        open_them()
    except DatasetError as e:
        log.warning("rebuilding %s: %s", " and ".join(paths), e)
        for p in paths:
            remove_quietly(p)
