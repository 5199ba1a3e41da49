"""The launcher's side of the data: which corpus, the tokenizer check, the stage sample index, the loaders and the
validation windows.

Rank 0 prepares whatever is missing (the built-in corpus on first use, the sample index); the other ranks wait for
it under GROWLENGTH_RANK0_TIMEOUT_MIN (not the collective timeout), then memory-map the same files; an error on
rank 0 is raised on every rank.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path


from data_pipeline.builtin_corpus import prepare_builtin_dataset
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.loader import StageLoader, window_batches
from data_pipeline.samples import GrowLengthSamples, data_fingerprint
from data_pipeline.provenance import DataFiles, check_tokenizer
from data_pipeline.tokenizer import Tokenizer
from launcher import distributed as dist
from launcher.config import RunConfig
from launcher.plan import Stage, StagePlan

log = logging.getLogger("growlength")

# optimizer steps of micro-batches read ahead by the loader's thread: two keep it one step ahead even when a step's
# reads are slower than usual; each is this rank's tokens_per_step / ranks tokens as int64
PREFETCH_STEPS = 2


def check_vocab(dataset: IndexedDataset, tokenizer: Tokenizer, prefix: str, probe_tokens: int = 1 << 22) -> None:
    """Refuse data whose token ids do not fit the tokenizer (a tokenizer/data mismatch).

    Checks the first and last ``probe_tokens`` tokens of the .bin: cheap on any size, and a mismatch made by a
    different tokenizer shows up in any stretch of real text.
    """
    tokens = dataset.tokens
    n = len(tokens)
    head, tail = tokens[: min(n, probe_tokens)], tokens[max(0, n - probe_tokens):]
    top = int(max(head.max(initial=0), tail.max(initial=0)))
    if top >= tokenizer.vocab_size:
        raise DatasetError(f"{prefix}.bin holds token id {top} but the tokenizer {tokenizer.path} has only "
                           f"{tokenizer.vocab_size} ids: the data was made with another tokenizer; set "
                           f"data.tokenizer to the model that preprocessed it (or preprocess again)")


@dataclass
class TrainData:
    cfg: RunConfig
    prefix: str
    tokenizer_path: str
    tokenizer: Tokenizer
    fingerprint: str
    rank: int
    world: int
    samples: GrowLengthSamples | None = None
    plan: StagePlan | None = None
    tokenizer_in_run: str | None = None  # the run directory's copy of the tokenizer (relative to RUN_DIR)
    files: DataFiles | None = None  # the .bin/.idx as opened: checked at stage switches and before each save

    def check_files(self, when: str) -> None:
        """Refuse to go on with data rewritten under the run (one line naming the file)."""
        if self.files is not None:
            self.files.check(when)

    @property
    def has_validation(self) -> bool:
        return self.cfg.data.valid_fraction > 0

    def cache_dir(self) -> Path:
        if self.cfg.data.cache_dir:
            return Path(self.cfg.data.cache_dir)
        return Path(self.cfg.run_dir).resolve().parent / ".index-cache"

    def build_index(self, plan: StagePlan) -> None:
        """The stage sample index: built (or found in the cache) by rank 0, then memory-mapped by all."""
        self.plan = plan
        d = self.cfg.data
        t0 = time.perf_counter()
        kwargs = dict(stages=plan.data_stages(), seed=self.cfg.seed, valid_fraction=d.valid_fraction,
                      epochs=d.epochs, cache_dir=str(self.cache_dir()))
        self.samples = GrowLengthSamples(self.prefix, **kwargs)
        # minutes on a large corpus: the others wait under GROWLENGTH_RANK0_TIMEOUT_MIN, not the collective timeout
        dist.wait_for_rank0(self.samples.build, self.rank, self.world)
        if self.rank != 0:
            self.samples.load()
        log.info("sample index ready in %.2fs (%s)", time.perf_counter() - t0, self.cache_dir())
        if self.samples.num_epochs > 1:
            log.warning("the plan needs %s tokens but %s holds %s training tokens: it repeats the data over %d "
                        "epochs, each in a new document order (data.epochs=error refuses this instead)",
                        f"{self.samples.tokens_needed:,}", self.prefix, f"{self.samples.tokens_per_epoch:,}",
                        self.samples.num_epochs)

    def loader(self, stage: Stage, consumed_steps: int, prefetch: int = PREFETCH_STEPS) -> StageLoader:
        """This rank's loader for ``stage``, positioned after ``consumed_steps`` optimizer steps of it; a thread
        reads ``prefetch`` steps ahead, into pinned memory on CUDA (close it at the stage's end)."""
        global_batch = stage.micro_batch_size * stage.grad_accum * self.world
        return StageLoader(self.samples, stage.index, stage.micro_batch_size, stage.grad_accum, self.rank,
                           self.world, consumed_samples=consumed_steps * global_batch,
                           documents=self.document_masking, prefetch=prefetch,
                           pin_memory=dist.device().type == "cuda")

    @property
    def document_masking(self) -> bool:
        """Batches come with their document boundaries for a model trained with masking."""
        return bool(self.cfg.model.document_masking)  # null: the presets' (off)

    def valid_batches(self, seq_len: int, eval_tokens: int, tokens_per_batch: int):
        """This rank's share of the validation windows at ``seq_len`` (``eval_tokens`` of them over all ranks), in
        batches of about ``tokens_per_batch``: ``(tokens (B, seq_len + 1), cu_seqlens or None)``, with document
        boundaries under document masking (see data_pipeline.loader.window_batches)."""
        return window_batches(self.samples.validation, seq_len, max(1, eval_tokens // seq_len), tokens_per_batch,
                              self.rank, self.world, self.document_masking)


def check_sources(cfg: RunConfig) -> Tokenizer:
    """Every source of data.sources exists and was made by data.tokenizer (its identity sidecar: vocabulary and
    EOD; without one, its largest token id against the vocabulary). Returns the shared tokenizer."""
    d = cfg.data
    if not Path(d.tokenizer).exists():
        raise DatasetError(f"data.tokenizer {d.tokenizer}: no such file; give the tokenizer that preprocessed every "
                           f"source of data.sources")
    tokenizer = Tokenizer(str(d.tokenizer))
    for name, prefix, _ in d.source_list():
        data_fingerprint(prefix)  # refuses a missing .bin/.idx with the file named
        if not check_tokenizer(prefix, tokenizer, f"data.tokenizer (source {name})"):
            check_vocab(IndexedDataset(prefix), tokenizer, prefix)
    return tokenizer


def prepare_data(cfg: RunConfig, rank: int, world: int) -> TrainData:
    d = cfg.data
    if d.sources is not None:
        check_sources(cfg)
        raise DatasetError("data.sources: the mixture is checked, but training on a mixture is not wired into the "
                           "run yet; train on one corpus with data.prefix (or merge the sources with growlength-merge)")
    if d.prefix is None:
        dist.wait_for_rank0(lambda: prepare_builtin_dataset(d.builtin_dir, vocab_size=d.builtin_vocab_size), rank, world)
        tokenizer_path, prefix = prepare_builtin_dataset(d.builtin_dir, vocab_size=d.builtin_vocab_size)
    else:
        tokenizer_path, prefix = d.tokenizer, d.prefix
    if not Path(tokenizer_path).exists():
        raise DatasetError(f"data.tokenizer {tokenizer_path}: no such file; give the tokenizer that preprocessed "
                           f"{prefix} (a sentencepiece .model, a tokenizer.json or its directory)")
    tokenizer = Tokenizer(str(tokenizer_path))
    files = DataFiles(str(prefix))
    files.name_on_sigbus()
    dataset = IndexedDataset(str(prefix))
    if not check_tokenizer(str(prefix), tokenizer, "data.tokenizer"):  # no record: the largest-id check
        check_vocab(dataset, tokenizer, str(prefix))
    return TrainData(cfg=cfg, prefix=str(prefix), tokenizer_path=str(tokenizer_path), tokenizer=tokenizer,
                     fingerprint=data_fingerprint(str(prefix)), rank=rank, world=world, files=files)
