"""Data pipeline benchmarks: preprocess against its tokenizer's own batch encoding, the sample-index build against
megatron-core's, the loader's tokens/s. Prints figures; method and results: docs/benchmarks.md.

    python benchmarks/bench_data_pipeline.py [--work-dir .cache/bench_data] [--repeats 3] [--mb 50]

Part 1c times preprocess on the same texts as .jsonl, .parquet, .jsonl.zst and a `datasets` directory (outputs
must be byte-identical), and the readers alone; figures in docs/data-formats.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline.atomic import atomic_path  # noqa: E402
from data_pipeline.builtin_corpus import iter_builtin_documents  # noqa: E402
from data_pipeline.indexed_dataset import IndexedDataset  # noqa: E402
from data_pipeline.loader import StageLoader  # noqa: E402
from data_pipeline.samples import GrowLengthSamples  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402
from data_pipeline.train_tokenizer import train_bytelevel_bpe, train_tokenizer  # noqa: E402


def make_corpus(path: str, target_mb: int) -> str:
    if os.path.isfile(path) and os.path.getsize(path) >= target_mb * 1e6:
        return path
    docs = list(iter_builtin_documents())
    rng = np.random.default_rng(0)
    size = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        while size < target_mb * 1e6:
            for i in rng.permutation(len(docs)):
                line = json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
    return path


def median_time(fn, repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_preprocess(corpus: str, model: str, work: str, repeats: int, megatron_tools: str | None) -> None:
    mb = os.path.getsize(corpus) / 1e6
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tok = Tokenizer(model)
    floor_name = "floor: sentencepiece encode, 2 threads"
    times: dict[str, list[float]] = {floor_name: [], "sentencepiece encode -> lists, 2 threads": [],
                                     "ours, 1 worker": [], "ours, 2 workers": []}
    if megatron_tools:
        times["Megatron-LM preprocess_data.py, 2 workers"] = []
    ntok = {}

    def ours(workers):
        out = os.path.join(work, f"bench_w{workers}")
        subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--input", corpus, "--output-prefix", out,
                        "--tokenizer-model", model, "--workers", str(workers), "--quiet"], check=True, cwd=ROOT)
        ntok["ours"] = IndexedDataset(out).num_tokens

    def floor():  # the fastest way to call sentencepiece: C++ ids straight into numpy arrays
        ids = tok.sp.encode(texts, num_threads=2, return_type="numpy")
        ntok["floor"] = sum(map(len, ids)) + len(ids)  # + one EOD per document, as written

    def floor_lists():  # the default return type (Python lists of ints), slower
        tok.sp.encode(texts, num_threads=2)

    def megatron():
        subprocess.run([sys.executable, os.path.join(megatron_tools, "tools", "preprocess_data.py"), "--input", corpus,
                        "--output-prefix", os.path.join(work, "megatron"), "--tokenizer-type",
                        "SentencePieceTokenizer", "--tokenizer-model", model, "--workers", "2", "--append-eod"],
                       check=True, cwd=megatron_tools, env={**os.environ, "PYTHONPATH": megatron_tools},
                       stdout=subprocess.DEVNULL)

    for _ in range(repeats):
        times[floor_name].append(_timed(floor))
        times["sentencepiece encode -> lists, 2 threads"].append(_timed(floor_lists))
        times["ours, 1 worker"].append(_timed(lambda: ours(1)))
        times["ours, 2 workers"].append(_timed(lambda: ours(2)))
        if megatron_tools:
            times["Megatron-LM preprocess_data.py, 2 workers"].append(_timed(megatron))
    assert ntok["ours"] == ntok["floor"], (ntok, "token counts differ")
    floor_s = statistics.median(times[floor_name])
    print(f"\n## preprocess: {mb:.1f} MB JSONL, {len(texts):,} documents, {ntok['ours']:,} tokens, "
          f"vocab {tok.vocab_size} BPE, median of {repeats}")
    print(f"{'':44s} {'seconds':>8s} {'MB/s':>7s} {'Mtok/s':>7s} {'vs floor':>9s}")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:44s} {s:8.2f} {mb / s:7.2f} {ntok['ours'] / s / 1e6:7.2f} {s / floor_s:8.2f}x   "
              f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")
    if not megatron_tools:
        print("Megatron-LM tools/preprocess_data.py: not available (the megatron-core wheel does not ship tools/; "
              "pass --megatron-tools PATH_TO_MEGATRON_LM to time it)")


def bench_preprocess_hf(corpus: str, tokenizer_dir: str, work: str, repeats: int, workers: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from data_pipeline.preprocess import BATCH_BYTES, BATCH_DOCS
    mb = os.path.getsize(corpus) / 1e6
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    hf = HFTokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    batches, batch, size = [], [], 0  # preprocess's batching (BATCH_BYTES of text or BATCH_DOCS documents)
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] if batch else []
    one_call, batched, ours_name = (f"floor: encode_batch_fast, one call, {workers} threads",
                                    f"floor: encode_batch_fast, 1 MB batches, {workers} threads",
                                    f"ours, {workers} workers")
    times: dict[str, list[float]] = {one_call: [], batched: [], ours_name: []}
    ntok = {}

    def floor_one_call():
        ntok["floor"] = sum(len(e) for e in hf.encode_batch_fast(texts, add_special_tokens=False)) + len(texts)

    def floor_batched():
        for b in batches:
            hf.encode_batch_fast(b, add_special_tokens=False)

    def ours():
        out = os.path.join(work, "bench_hf")
        subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--input", corpus, "--output-prefix", out,
                        "--tokenizer-model", tokenizer_dir, "--workers", str(workers), "--quiet"],
                       check=True, cwd=ROOT)
        ntok["ours"] = IndexedDataset(out).num_tokens

    for _ in range(repeats):  # interleaved, so machine noise hits all three alike
        times[one_call].append(_timed(floor_one_call))
        times[batched].append(_timed(floor_batched))
        times[ours_name].append(_timed(ours))
    assert ntok["ours"] == ntok["floor"], (ntok, "token counts differ")
    floor_s = min(statistics.median(times[one_call]), statistics.median(times[batched]))
    print(f"\n## preprocess, HF tokenizer.json: {mb:.1f} MB JSONL, {len(texts):,} documents, {ntok['ours']:,} tokens, "
          f"byte-level BPE vocab {hf.get_vocab_size()}, median of {repeats}")
    print(f"{'':52s} {'seconds':>8s} {'MB/s':>7s} {'Mtok/s':>7s} {'vs floor':>9s}")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:52s} {s:8.2f} {mb / s:7.2f} {ntok['ours'] / s / 1e6:7.2f} {s / floor_s:8.2f}x   "
              f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")


def bench_formats(corpus: str, model: str, work: str, repeats: int) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    datasets.disable_progress_bars()
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    inputs = {".jsonl": corpus, ".parquet": os.path.join(work, "formats.parquet"),
              ".jsonl.zst": os.path.join(work, "formats.jsonl.zst"), "datasets dir": os.path.join(work, "formats_ds")}
    if not os.path.isfile(inputs[".parquet"]):
        pq.write_table(pa.table({"text": texts}), inputs[".parquet"])
    if not os.path.isfile(inputs[".jsonl.zst"]):
        with open(corpus, "rb") as src, open(inputs[".jsonl.zst"], "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    if not os.path.isdir(inputs["datasets dir"]):
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(inputs["datasets dir"])
    bench_reading(inputs, len(texts), repeats)
    times: dict[str, list[float]] = {name: [] for name in inputs}
    outputs = {}

    def run(name):
        out = os.path.join(work, "formats_out_" + name.replace(" ", "_").strip("."))
        subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--input", inputs[name], "--output-prefix",
                        out, "--tokenizer-model", model, "--workers", "2", "--quiet"], check=True, cwd=ROOT)
        outputs[name] = [open(out + ext, "rb").read() for ext in (".bin", ".idx")]

    for _ in range(repeats):  # interleaved, so machine noise hits every format alike
        for name in inputs:
            times[name].append(_timed(lambda: run(name)))
    assert all(o == outputs[".jsonl"] for o in outputs.values()), "a format's output differs from the .jsonl path's"
    base = statistics.median(times[".jsonl"])
    print(f"\n## preprocess by input format: {len(texts):,} documents, 2 workers, median of {repeats} "
          f"(outputs byte-identical)")
    print(f"{'':16s} {'input MB':>9s} {'seconds':>8s} {'vs .jsonl':>10s}")
    for name, ts in times.items():
        path = inputs[name]
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) \
            else os.path.getsize(path)
        print(f"{name:16s} {size / 1e6:9.1f} {statistics.median(ts):8.2f} {statistics.median(ts) / base:9.3f}x   "
              f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")


def bench_reading(inputs: dict[str, str], documents: int, repeats: int) -> None:
    """The readers alone (no tokenizer): every document of each input through corpus.iter_documents."""
    from data_pipeline.corpus import check_inputs, iter_documents
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(repeats):
        for name, path in inputs.items():
            sources = check_inputs([path])
            times[name].append(_timed(lambda: sum(1 for _ in iter_documents(sources))))
    base = statistics.median(times[".jsonl"])
    print(f"\n## reading only (data_pipeline.corpus.iter_documents): {documents:,} documents, median of {repeats}")
    print(f"{'':16s} {'seconds':>8s} {'vs .jsonl':>10s}")
    for name, ts in times.items():
        print(f"{name:16s} {statistics.median(ts):8.3f} {statistics.median(ts) / base:9.3f}x   "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)})")


def megatron_index_build(ds: IndexedDataset, seq_len: int, num_samples: int, seed: int) -> int:
    """megatron-core GPTDataset._build_document_sample_shuffle_indices, minus the saving: its three steps."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    tokens_per_epoch = int(ds.sequence_lengths.sum())
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_len < num_samples:
        epochs += 1
    rs = np.random.RandomState(seed)
    documents = np.arange(ds.num_documents, dtype=np.int32)
    doc_index = _build_document_index(documents, epochs, rs, False)
    sample_index = helpers.build_sample_idx(np.array(ds.sequence_lengths), doc_index, seq_len, epochs,
                                            tokens_per_epoch, True, True)
    shuffle = _build_shuffle_index(sample_index.shape[0] - 1, sample_index.shape[0] - 1, rs)
    return len(shuffle)


def bench_index(prefix: str, work: str, repeats: int) -> None:
    import shutil
    import warnings
    with warnings.catch_warnings():  # import (and its warnings about missing GPU libraries) outside the timing
        warnings.simplefilter("ignore")
        import megatron.core.datasets.gpt_dataset  # noqa: F401
        from megatron.core.datasets import helpers  # noqa: F401
    ds = IndexedDataset(prefix)
    print(f"\n## sample-index build over {ds.num_tokens:,} tokens ({ds.num_documents:,} documents), median of {repeats}")
    print(f"{'':28s} {'ours (memory)':>14s} {'ours (+cache)':>14s} {'megatron-core':>14s} {'ratio':>6s}")
    for seq_len, n in ((128, 10_000_000), (1024, 1_000_000)):
        plan = [(seq_len, seq_len * n)]
        cache = os.path.join(work, "index_cache")
        mem, disk, meg = [], [], []

        def ours_disk():
            shutil.rmtree(cache, ignore_errors=True)
            GrowLengthSamples(ds, plan, seed=1234, cache_dir=cache).build()
        for _ in range(repeats):
            mem.append(_timed(lambda: GrowLengthSamples(ds, plan, seed=1234).build()))
            disk.append(_timed(ours_disk))
            meg.append(_timed(lambda: megatron_index_build(ds, seq_len, n, 1234)))
        m, d, g = map(statistics.median, (mem, disk, meg))
        print(f"{n:>11,} samples @ {seq_len:<5d}  {m:13.2f}s {d:13.2f}s {g:13.2f}s {m / g:5.2f}x")
        shutil.rmtree(cache, ignore_errors=True)


def bench_loader(prefix: str, repeats: int) -> None:
    ds = IndexedDataset(prefix)
    print(f"\n## loader: rank 0 of 2, tokens/s yielded as torch tensors, median of {repeats}")
    for seq_len, mbs, accum in ((128, 32, 4), (1024, 4, 4)):
        steps = 50
        n = steps * mbs * accum * 2
        s = GrowLengthSamples(ds, [(seq_len, seq_len * n)], seed=0).build()

        def run():
            for _ in StageLoader(s, 0, mbs, accum, rank=0, world_size=2):
                pass
        t = median_time(run, repeats)
        tokens = steps * mbs * accum * (seq_len + 1)
        print(f"seq_len {seq_len:5d} micro_batch {mbs:3d} x accum {accum}: {tokens / t / 1e6:7.2f}M tokens/s per rank")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=os.path.join(ROOT, ".cache", "bench_data"))
    p.add_argument("--mb", type=int, default=50, help="corpus size in MB (default 50)")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary (default 32000, as the issue)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--megatron-tools", default=None, help="path to a Megatron-LM checkout (for tools/preprocess_data.py)")
    p.add_argument("--hf-workers", type=int, default=os.cpu_count() or 1,
                   help="threads of the HF tokenizers library in 1b, floor and ours alike (default: all cores)")
    p.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "preprocess-hf", "formats", "index",
                                                                 "loader"])
    args = p.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.hf_workers)  # the library's pool in this process, before first use
    os.makedirs(args.work_dir, exist_ok=True)
    t0 = time.time()
    corpus = make_corpus(os.path.join(args.work_dir, f"corpus{args.mb}.jsonl"), args.mb)
    model = os.path.join(args.work_dir, f"tok{args.vocab_size}.model")
    if not os.path.isfile(model):
        train_tokenizer([os.path.join(args.work_dir, corpus)], model[:-6], vocab_size=args.vocab_size,
                        input_sentence_size=300_000, quiet=True)
    print(f"# data pipeline benchmarks ({os.cpu_count()} CPUs; setup {time.time() - t0:.0f} s)")
    if "preprocess" not in args.skip:
        bench_preprocess(corpus, model, args.work_dir, args.repeats, args.megatron_tools)
    if "preprocess-hf" not in args.skip:
        hf_dir = os.path.join(args.work_dir, f"bpe{args.vocab_size}")
        if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            train_bytelevel_bpe([corpus], hf_dir, vocab_size=args.vocab_size, quiet=True)
        bench_preprocess_hf(corpus, hf_dir, args.work_dir, args.repeats, args.hf_workers)
    if "formats" not in args.skip:
        bench_formats(corpus, model, args.work_dir, args.repeats)
    prefix = os.path.join(args.work_dir, "bench_w2")
    if not os.path.isfile(prefix + ".idx"):
        subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--input", corpus, "--output-prefix", prefix,
                        "--tokenizer-model", model, "--quiet"], check=True, cwd=ROOT)
    if "index" not in args.skip:
        bench_index(prefix, args.work_dir, args.repeats)
    if "loader" not in args.skip:
        bench_loader(prefix, args.repeats)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
