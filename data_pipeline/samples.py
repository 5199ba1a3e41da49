"""Fixed-length samples for GrowLength stages, cut from one token stream so no token is skipped or repeated.

Stage k's sample i (before its seeded shuffle) is `stream[p_k + i*L_k : p_k + (i+1)*L_k + 1]`, where the stream
is the training documents in a seeded order per epoch and `p_k` the tokens of the stages before. A seeded share of
documents is held out for validation. The index is deterministic and cached under a key of everything it depends
on, verified on load: rank 0 `build()`s, every rank `load()`s. Reference: docs/data-pipeline.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from data_pipeline.errors import DatasetError, SamplePlanError
from data_pipeline.atomic import atomic_dir, remove_quietly, remove_stale_temps_in, tmp_name
from data_pipeline.files import os_error
from data_pipeline.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # tick when the sample logic changes: old caches then stop matching
_EPOCH_TAG, _STAGE_TAG, _SPLIT_TAG = 1, 2, 3  # keep the seed streams of different uses apart
_MB = 1 << 20


def data_fingerprint(prefix: str) -> str:
    """Cheap identity of PREFIX.bin/.idx: sizes, a hash of the whole .idx, and of the first/last MB of .bin."""
    ds_idx, ds_bin = f"{prefix}.idx", f"{prefix}.bin"
    for path in (ds_idx, ds_bin):
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: file not found; create it with `python -m data_pipeline.preprocess`")
    h = hashlib.sha256()
    h.update(f"{os.path.getsize(ds_idx)}:{os.path.getsize(ds_bin)}".encode())
    with open(ds_idx, "rb") as f:
        while chunk := f.read(16 * _MB):
            h.update(chunk)
    with open(ds_bin, "rb") as f:
        h.update(f.read(_MB))
        f.seek(max(0, os.path.getsize(ds_bin) - _MB))
        h.update(f.read(_MB))
    return h.hexdigest()[:20]


class CacheMismatch(DatasetError):
    """A cached sample index that cannot be trusted (unreadable, or not what its meta.json says was built)."""


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array)).hexdigest()


def check_stages(stages) -> list[tuple[int, int]]:
    """Validate a stage plan [(seq_len, tokens), ...]; tokens must be a positive multiple of seq_len."""
    plan = [tuple(s) for s in stages]
    if not plan:
        raise SamplePlanError("stages: empty stage plan; give at least one (seq_len, tokens) pair")
    for k, stage in enumerate(plan):
        if len(stage) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in stage):
            raise SamplePlanError(f"stage {k}: {stage!r} is not a (seq_len, tokens) pair of integers")
        seq_len, tokens = stage
        if seq_len < 1 or tokens < 1:
            raise SamplePlanError(f"stage {k}: seq_len {seq_len} and tokens {tokens} must both be positive")
        if tokens % seq_len:
            q, r = divmod(tokens, seq_len)
            raise SamplePlanError(f"stage {k}: tokens {tokens} is not a multiple of seq_len {seq_len}: "
                                  f"{tokens} = {q} * {seq_len} + {r}; use tokens {q * seq_len} or "
                                  f"{(q + 1) * seq_len}")
    return [(int(a), int(b)) for a, b in plan]


def split_documents(num_documents: int, valid_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document ids, each sorted; round(valid_fraction * D) held out (at least 1 if > 0)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise SamplePlanError(f"valid_fraction {valid_fraction}: must be in [0, 1)")
    n_valid = int(round(valid_fraction * num_documents))
    if valid_fraction > 0:
        n_valid = max(n_valid, 1)
    if n_valid >= num_documents:
        raise SamplePlanError(f"valid_fraction {valid_fraction}: holds out {n_valid} of {num_documents} documents, "
                              f"leaving none to train on; lower valid_fraction or add documents")
    rng = np.random.default_rng([split_seed, _SPLIT_TAG])
    is_valid = np.zeros(num_documents, dtype=bool)
    is_valid[rng.permutation(num_documents)[:n_valid]] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def _gather(tokens: np.ndarray, doc_starts: np.ndarray, stream_docs: np.ndarray, stream_cum: np.ndarray,
            positions: np.ndarray) -> np.ndarray:
    """Tokens at stream positions (any shape) -> int64 array of the same shape.

    stream_cum[j] is where the j-th document of the stream starts; stream_docs[j] is its document id.
    """
    flat = positions.reshape(-1)
    seg = np.searchsorted(stream_cum, flat, side="right") - 1   # stream document holding each position
    bin_pos = doc_starts[stream_docs[seg]] + (flat - stream_cum[seg])
    return tokens[bin_pos].astype(np.int64).reshape(positions.shape)


def window_cu_seqlens(doc_starts: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Document boundaries of the input windows [s, s + seq_len) of a stream, in flash-attn's varlen layout.

    doc_starts: the stream offset where each document starts, ascending (a stream_cum); starts: (n,) window
    starts. Returns cu_seqlens (m + 1,) int32 over the n * seq_len flattened inputs: every row start i * seq_len
    and, inside row i, i * seq_len + c - s_i for each document start c with s_i < c < s_i + seq_len, then
    n * seq_len. A document's EOD is its last token, so the token after an EOD starts a segment. Read from the
    document offsets the index already holds (two binary searches per window), not by scanning tokens for EOD.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    n = len(starts)
    first = np.searchsorted(doc_starts, starts, side="right")         # first document start after s_i
    stop = np.searchsorted(doc_starts, starts + seq_len, side="left")  # ... and the first at or past s_i + L
    counts = stop - first                                              # (n,) documents starting inside row i
    before = np.cumsum(counts) - counts                                # interior boundaries of earlier rows
    row = np.repeat(np.arange(n, dtype=np.int64), counts)              # (sum counts,) the row of each
    within = np.arange(len(row), dtype=np.int64) - before[row]         # 0, 1, ... inside each row
    out = np.empty(n + len(row) + 1, dtype=np.int64)
    row_at = np.arange(n, dtype=np.int64) + before                     # where row i's start goes in out
    out[row_at] = np.arange(n, dtype=np.int64) * seq_len
    out[row_at[row] + 1 + within] = doc_starts[first[row] + within] - starts[row] + row * seq_len
    out[-1] = n * seq_len
    return out.astype(np.int32)


class WindowStream:
    """Whole windows over some documents of a dataset taken in order as one stream: the one rule for validation
    windows (the launcher's in-loop validation and evidence.evaluate). Window i is stream[i*L : i*L + L + 1]
    (consecutive windows share one token, so every token is a label once), never truncated.

    ``held_out``: a run's validation split (``split_documents``); ``every_document``: a separate corpus."""

    def __init__(self, dataset: IndexedDataset, docs: np.ndarray, what: str, fix: str):
        self.dataset, self.docs, self.what, self.fix = dataset, np.asarray(docs, dtype=np.int64), what, fix
        self._starts, lengths = dataset.document_token_bounds()
        self._cum = np.concatenate([[0], np.cumsum(lengths[self.docs])]).astype(np.int64)
        self.tokens = int(self._cum[-1])
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def held_out(cls, dataset: IndexedDataset, valid_fraction: float, split_seed: int = 0) -> "WindowStream":
        """The documents a run with this ``valid_fraction`` and ``split_seed`` held out, in id order."""
        _, valid = split_documents(dataset.num_documents, float(valid_fraction), int(split_seed))
        return cls(dataset, valid, f"the validation split (valid_fraction {valid_fraction})",
                   "raise valid_fraction or evaluate shorter lengths")

    @classmethod
    def every_document(cls, dataset: IndexedDataset) -> "WindowStream":
        """Every document of a (separate) corpus, in its own order."""
        return cls(dataset, np.arange(dataset.num_documents), "the corpus", "evaluate shorter lengths or a larger "
                   "corpus")

    def windows(self, seq_len: int, max_windows: int | None = None) -> np.ndarray:
        """(n, seq_len + 1) int64, n = min(max_windows, (tokens - 1) // seq_len) (kept: the same windows at every
        evaluation); raises if not even one window fits."""
        if seq_len < 1:
            raise SamplePlanError(f"seq_len {seq_len}: must be positive")
        n = (self.tokens - 1) // seq_len if self.tokens else 0
        if max_windows is not None:
            n = min(n, int(max_windows))
        if n <= 0:
            raise DatasetError(f"{self.dataset.prefix}: {self.what} has {self.tokens:,} tokens, fewer than one "
                               f"window of seq_len {seq_len} + 1; {self.fix}")
        if (seq_len, n) not in self._windows:
            positions = (np.arange(n, dtype=np.int64) * seq_len)[:, None] + np.arange(seq_len + 1)[None, :]
            self._windows[seq_len, n] = _gather(self.dataset.tokens, self._starts, self.docs, self._cum, positions)
        return self._windows[seq_len, n]

    def cu_seqlens(self, seq_len: int, rows) -> np.ndarray:
        """Document boundaries of windows ``rows`` (indices into ``windows(seq_len)``): cu_seqlens over their
        flattened inputs, as the training loader gives them (see ``window_cu_seqlens``)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return window_cu_seqlens(self._cum, rows * seq_len, seq_len)


class GrowLengthSamples:
    """Stage-wise fixed-length samples over one token stream (see the module docstring for the exact rule).

    Args:
        dataset_or_prefix: an IndexedDataset or the PREFIX of PREFIX.bin/.idx.
        stages: [(seq_len_k, tokens_k), ...]; tokens_k a multiple of seq_len_k.
        seed: orders documents per epoch and shuffles samples per stage.
        valid_fraction: fraction of documents held out for validation (0 = none).
        epochs: "repeat" continues into the next epoch's order when the plan needs more tokens than one epoch
            holds; "error" refuses such a plan.
        cache_dir: where the index is cached (None: build in memory, never written).
        split_seed: seeds the train/validation split (independent of `seed`).
    """

    def __init__(self, dataset_or_prefix, stages, seed: int, valid_fraction: float = 0.0, epochs: str = "repeat",
                 cache_dir: str | None = None, split_seed: int = 0):
        self.dataset = (dataset_or_prefix if isinstance(dataset_or_prefix, IndexedDataset)
                        else IndexedDataset(dataset_or_prefix))
        ds = self.dataset
        self.stages = check_stages(stages)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SamplePlanError(f"seed {seed!r}: must be a non-negative integer")
        if epochs not in ("repeat", "error"):
            raise SamplePlanError(f"epochs {epochs!r}: must be 'repeat' or 'error'")
        if not np.issubdtype(ds.dtype, np.integer):
            raise DatasetError(f"{ds.idx_path}: token dtype {ds.dtype.name} is not an integer type; "
                               f"re-create it with `python -m data_pipeline.preprocess`")
        if ds.num_documents == 0:
            raise DatasetError(f"{ds.idx_path}: the dataset has no documents; preprocess a non-empty corpus")
        self.seed, self.valid_fraction, self.epochs = int(seed), float(valid_fraction), epochs
        self.split_seed, self.cache_dir = int(split_seed), cache_dir
        self.doc_starts, self.doc_lengths = ds.document_token_bounds()
        doc_lengths = self.doc_lengths
        self.train_docs, self.valid_docs = split_documents(ds.num_documents, self.valid_fraction, self.split_seed)
        self.tokens_per_epoch = int(doc_lengths[self.train_docs].sum())
        self.valid_tokens = int(doc_lengths[self.valid_docs].sum())
        if self.tokens_per_epoch < 2:
            raise DatasetError(f"{ds.prefix}: only {self.tokens_per_epoch} training tokens; add data")
        self.stage_offsets = np.concatenate([[0], np.cumsum([t for _, t in self.stages])]).astype(np.int64)
        # the last sample's last label is one token past the plan
        self.tokens_needed = int(self.stage_offsets[-1]) + 1
        self.num_epochs = -(-self.tokens_needed // self.tokens_per_epoch)
        if epochs == "error" and self.num_epochs > 1:
            raise SamplePlanError(
                f"stage plan needs {self.tokens_needed:,} tokens (sum of stage tokens {int(self.stage_offsets[-1]):,}"
                f" + 1 for the last label), but {ds.prefix} has {self.tokens_per_epoch:,} training tokens per epoch "
                f"(valid_fraction {self.valid_fraction} holds out {self.valid_tokens:,}): {self.num_epochs} epochs. "
                f"Add data, lower the stage token budgets, or allow repeats with epochs='repeat'")
        self.data_fingerprint = data_fingerprint(ds.prefix)
        self.fingerprint = f"{self.data_fingerprint}:valid_fraction={self.valid_fraction}:split_seed={self.split_seed}"
        key = json.dumps({"version": INDEX_VERSION, "data": self.fingerprint, "seed": self.seed,
                          "stages": self.stages}, sort_keys=True)
        self.cache_key = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.validation = WindowStream(ds, self.valid_docs, f"the validation split (valid_fraction "
                                       f"{self.valid_fraction})", "raise valid_fraction or evaluate shorter lengths")
        self._index: dict[str, np.ndarray] | None = None

    # --- the index -----------------------------------------------------------------------------------------
    def _compute(self) -> dict[str, np.ndarray]:
        """Epoch orders and per-stage shuffles (vectorised; one small RNG per epoch/stage)."""
        doc_lengths = self.doc_lengths
        id_dtype = np.int32 if self.dataset.num_documents < 2**31 else np.int64
        orders = []
        for e in range(self.num_epochs):
            rng = np.random.default_rng([self.seed, _EPOCH_TAG, e])
            orders.append(self.train_docs[rng.permutation(len(self.train_docs))].astype(id_dtype))
        stream_docs = np.concatenate(orders)   # (epochs * train docs,) document ids in stream order
        stream_cum = np.zeros(len(stream_docs) + 1, dtype=np.int64)
        np.cumsum(doc_lengths[stream_docs], out=stream_cum[1:])
        index = {"stream_docs": stream_docs, "stream_cum": stream_cum}
        for k, (seq_len, tokens) in enumerate(self.stages):
            n = tokens // seq_len
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            np.random.default_rng([self.seed, _STAGE_TAG, k]).shuffle(order)
            index[f"order_{k}"] = order
        return index

    @property
    def cache_path(self) -> str | None:
        if self.cache_dir is None:
            return None
        return os.path.join(self.cache_dir, f"growlength-samples-v{INDEX_VERSION}-{self.cache_key}")

    def _names(self) -> list[str]:
        return ["stream_docs", "stream_cum"] + [f"order_{k}" for k in range(len(self.stages))]

    def build(self) -> "GrowLengthSamples":
        """Compute the index and, with a cache_dir, write it (temp dir, then rename) unless a verified one is there.

        Call on one rank (rank 0); after a barrier the others call `load()`. A cached index that fails
        verification is replaced (with a warning)."""
        if self.cache_path is not None:
            remove_stale_temps_in(self.cache_dir)  # KEY.tmp-PID* of builds that were killed
            if os.path.isdir(self.cache_path):
                try:
                    return self.load()
                except CacheMismatch as e:
                    log.warning("%s; rebuilding it", e)
                    self._discard_cache()
        index = self._compute()
        if self.cache_path is not None:
            self._write_cache(index)
        self._index = index
        return self

    def _write_cache(self, index: dict[str, np.ndarray]) -> None:
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with atomic_dir(self.cache_path, replace=False) as tmp:  # a lost race keeps the other builder's copy
                arrays = {}
                for name in self._names():
                    np.save(os.path.join(tmp, f"{name}.npy"), index[name])
                    arrays[name] = {"dtype": index[name].dtype.str, "shape": list(index[name].shape),
                                    "sha256": _sha256(index[name])}
                meta = {"version": INDEX_VERSION, "fingerprint": self.fingerprint, "seed": self.seed,
                        "stages": self.stages, "prefix": os.path.abspath(self.dataset.prefix), "arrays": arrays}
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f, indent=1)
        except OSError as e:
            raise self._cache_write_error(e.filename or self.cache_dir, e) from None

    def _cache_write_error(self, path: str, e: OSError) -> DatasetError:
        err = os_error(path, e)
        return DatasetError(f"sample index cache_dir {self.cache_dir}: {err} (set data.cache_dir to another "
                            f"directory)")

    def _discard_cache(self) -> None:
        """Move a bad cache out of the way (a rename, so a reader never sees it half-deleted), then delete it."""
        trash = tmp_name(self.cache_path) + "-bad"
        try:
            os.rename(self.cache_path, trash)
        except FileNotFoundError:  # another builder moved it first
            return
        except OSError as e:
            raise self._cache_write_error(self.cache_path, e) from None
        remove_quietly(trash)

    def load(self) -> "GrowLengthSamples":
        """Memory-map an index that `build()` wrote (on this or another rank), after verifying it.

        Raises CacheMismatch (a DatasetError) naming the file when it is unreadable or does not match."""
        if self.cache_path is None:
            raise SamplePlanError("load(): no cache_dir was given; pass cache_dir=... or call build()")
        if not os.path.isdir(self.cache_path):
            raise DatasetError(f"{self.cache_path}: sample index not built; call build() on rank 0 (then a "
                               f"barrier) before load() on the other ranks")
        fix = f"delete {self.cache_path} and rebuild (rank 0's build() does)"
        meta_path = os.path.join(self.cache_path, "meta.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            arrays = meta["arrays"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheMismatch(f"{meta_path}: unreadable cached sample index meta ({type(e).__name__}: {e}); "
                                f"{fix}") from None
        index = {}
        for name in self._names():
            path = os.path.join(self.cache_path, f"{name}.npy")
            try:
                index[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CacheMismatch(f"{path}: unreadable cached sample index ({e}); {fix}") from None
        problem = self._verify(meta, arrays, index)
        if problem is not None:
            raise CacheMismatch(f"{self.cache_path}: cached sample index does not match: {problem}; {fix}")
        self._index = index
        return self

    def _verify(self, meta: dict, arrays: dict, index: dict[str, np.ndarray]) -> str | None:
        """None if the cached index is what this plan builds, else what is wrong (cheap checks first)."""
        for key, mine in (("version", INDEX_VERSION), ("fingerprint", self.fingerprint), ("seed", self.seed),
                          ("stages", [list(s) for s in self.stages])):
            if meta.get(key) != mine:
                return f"meta.json {key} {meta.get(key)!r}, expected {mine!r}"
        n_stream = self.num_epochs * len(self.train_docs)
        shapes = {"stream_docs": (n_stream,), "stream_cum": (n_stream + 1,)}
        shapes.update({f"order_{k}": (self.num_samples(k),) for k in range(len(self.stages))})
        for name, array in index.items():
            if array.shape != shapes[name] or not np.issubdtype(array.dtype, np.integer):
                return f"{name}.npy is {array.dtype.name}{list(array.shape)}, expected integers of shape " \
                       f"{list(shapes[name])}"
            recorded = arrays.get(name) if isinstance(arrays, dict) else None
            if not isinstance(recorded, dict) or recorded.get("dtype") != array.dtype.str or \
                    recorded.get("shape") != list(array.shape):
                return f"{name}.npy differs from the dtype/shape recorded in meta.json"
        cum = index["stream_cum"]
        if cum[0] != 0 or cum[-1] != self.num_epochs * self.tokens_per_epoch:
            return (f"stream_cum runs from {int(cum[0])} to {int(cum[-1])}, expected 0 to "
                    f"{self.num_epochs * self.tokens_per_epoch} (epochs x training tokens)")
        for name, array in index.items():
            if _sha256(array) != arrays[name].get("sha256"):
                return f"{name}.npy checksum differs from the one recorded when it was built (changed since)"
        return None

    @property
    def index(self) -> dict[str, np.ndarray]:
        if self._index is None:
            self.build()
        return self._index

    # --- serving -------------------------------------------------------------------------------------------
    def num_samples(self, stage: int) -> int:
        seq_len, tokens = self.stages[self._check_stage(stage)]
        return tokens // seq_len

    def seq_len(self, stage: int) -> int:
        return self.stages[self._check_stage(stage)][0]

    def _check_stage(self, stage: int) -> int:
        if not 0 <= stage < len(self.stages):
            raise IndexError(f"stage {stage} out of range: the plan has {len(self.stages)} stages")
        return stage

    def stream_positions(self, stage: int, indices) -> np.ndarray:
        """Stream offset of the first token of each (shuffled) sample: (n,) int64."""
        n = self.num_samples(stage)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise IndexError(f"sample {bad} out of range for stage {stage} ({n} samples)")
        unshuffled = np.asarray(self.index[f"order_{stage}"][idx], dtype=np.int64)
        return self.stage_offsets[stage] + unshuffled * self.stages[stage][0]

    def samples(self, stage: int, indices) -> np.ndarray:
        """Samples `indices` (in the stage's shuffled order) -> (n, seq_len + 1) int64."""
        seq_len = self.seq_len(stage)
        starts = self.stream_positions(stage, indices)
        positions = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]  # (n, L+1)
        return self._stream_tokens(positions)

    def cu_seqlens(self, stage: int, indices) -> np.ndarray:
        """Document boundaries of the inputs of samples `indices` (a micro-batch): cu_seqlens (m + 1,) int32 over
        their len(indices) * seq_len flattened inputs (see window_cu_seqlens)."""
        return window_cu_seqlens(self.index["stream_cum"], self.stream_positions(stage, indices),
                                 self.seq_len(stage))

    def sample(self, stage: int, i: int) -> np.ndarray:
        """One sample: (seq_len + 1,) int64."""
        return self.samples(stage, [i])[0]

    def _stream_tokens(self, positions: np.ndarray) -> np.ndarray:
        # epochs are back to back: the whole-stream offsets already include earlier epochs
        return _gather(self.dataset.tokens, self.doc_starts, self.index["stream_docs"], self.index["stream_cum"],
                       positions)

    def stream(self, start: int, stop: int) -> np.ndarray:
        """The training stream's tokens [start, stop) (for inspection and tests)."""
        if not 0 <= start <= stop <= self.num_epochs * self.tokens_per_epoch:
            raise IndexError(f"stream range [{start}, {stop}) outside the indexed "
                             f"{self.num_epochs * self.tokens_per_epoch} tokens")
        return self._stream_tokens(np.arange(start, stop, dtype=np.int64))

    def __repr__(self) -> str:
        plan = ", ".join(f"{L}x{self.num_samples(k)}" for k, (L, _) in enumerate(self.stages))
        return (f"GrowLengthSamples({self.dataset.prefix!r}, stages [{plan}], seed {self.seed}, "
                f"{self.tokens_per_epoch:,} train tokens/epoch, {self.num_epochs} epoch(s))")
