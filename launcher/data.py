"""The launcher's side of the data: which corpus, the tokenizer check, the stage sample index, the loaders.

Rank 0 prepares whatever is missing (the built-in corpus on first use, the sample index); the other ranks wait
at a barrier and then memory-map the same files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.builtin_corpus import prepare_builtin_dataset
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.loader import MicroBatch, StageLoader
from data_pipeline.samples import GrowLengthSamples, data_fingerprint
from data_pipeline.tokenizer import Tokenizer
from launcher import engine as ds
from launcher.config import ConfigError, ModelSection, RunConfig
from launcher.plan import Stage, StagePlan, micro_batch_for
from model import CausalLM, ModelConfig

log = logging.getLogger("growlength")


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
    model_config: ModelConfig
    rank: int
    world: int
    samples: GrowLengthSamples | None = None
    plan: StagePlan | None = None
    tokenizer_in_run: str | None = None  # the run directory's copy of the tokenizer (relative to RUN_DIR)
    _valid_cache: dict = field(default_factory=dict, repr=False)

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
        if self.rank == 0:
            self.samples.build()
        ds.barrier()
        if self.rank != 0:
            self.samples.load()
        log.info("sample index ready in %.2fs (%s)", time.perf_counter() - t0, self.cache_dir())
        if self.samples.num_epochs > 1:
            log.warning("the plan needs %s tokens but %s holds %s training tokens: it repeats the data over %d "
                        "epochs, each in a new document order (data.epochs=error refuses this instead)",
                        f"{self.samples.tokens_needed:,}", self.prefix, f"{self.samples.tokens_per_epoch:,}",
                        self.samples.num_epochs)

    def loader(self, stage: Stage, consumed_steps: int) -> StageLoader:
        """This rank's loader for ``stage``, positioned after ``consumed_steps`` optimizer steps of it."""
        global_batch = stage.micro_batch_size * stage.grad_accum * self.world
        return StageLoader(self.samples, stage.index, stage.micro_batch_size, stage.grad_accum, self.rank,
                           self.world, consumed_samples=consumed_steps * global_batch,
                           documents=self.document_masking)

    @property
    def document_masking(self) -> bool:
        """Batches come with their document boundaries (``MicroBatch``es) for a model trained with masking."""
        return self.model_config.document_masking

    def valid_batches(self, seq_len: int, eval_tokens: int, tokens_per_batch: int):
        """This rank's share of the validation windows at ``seq_len``, in batches of about ``tokens_per_batch``:
        LongTensors (B, seq_len + 1), or ``MicroBatch``es with their document boundaries under document masking."""
        key = (seq_len, eval_tokens)
        if key not in self._valid_cache:  # the same windows at every eval: gather them once
            windows = self.samples.valid_samples(seq_len, max(1, eval_tokens // seq_len))  # (n, seq_len + 1)
            self._valid_cache[key] = np.ascontiguousarray(windows[self.rank::self.world], dtype=np.int64)
        mine = self._valid_cache[key]
        bs = max(1, tokens_per_batch // seq_len)
        for i in range(0, len(mine), bs):
            tokens = torch.from_numpy(mine[i:i + bs])
            if not self.document_masking:
                yield tokens
                continue
            rows = np.arange(i, i + len(tokens)) * self.world + self.rank  # indices into valid_samples
            yield MicroBatch(tokens, torch.from_numpy(self.samples.valid_cu_seqlens(seq_len, rows)))

    def build_model(self) -> CausalLM:
        torch.manual_seed(self.cfg.seed)
        model = CausalLM(self.model_config)
        if self.cfg.model.init_from_hf:
            from model.hf import load_hf_weights
            try:
                load_hf_weights(model, self.cfg.model.init_from_hf)
            except ValueError as e:
                raise ConfigError(f"model.init_from_hf: {e}") from e
        return model

    def step_time_probe(self, seq_lens: list[int], dtype: torch.dtype = torch.float32) -> list[float]:
        """Seconds per optimizer step at each length (forward + backward of this rank's share of
        ``tokens_per_step``), measured on a throw-away copy of the model in the training dtype; the slowest rank
        counts. Only the ratios between lengths matter for a time-share plan with a token total."""
        g = self.cfg.growlength
        model = CausalLM(self.model_config).to(device=ds.device(), dtype=dtype)
        out = []
        for i, seq_len in enumerate(seq_lens):
            mb, accum = micro_batch_for(seq_len, g.tokens_per_step, self.world, g.grad_accum,
                                        g.max_tokens_per_micro_batch, f"growlength.stages[{i}]")
            x = torch.randint(0, self.model_config.vocab_size, (mb, seq_len + 1), device=ds.device())
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(accum):
                    model(x[:, :-1], labels=x[:, 1:]).backward()
                times.append(time.perf_counter() - t0)
            out.append(min(times[1:]))
        del model
        out = ds.all_reduce_max(out)
        log.info("step-time probe: %s", ", ".join(f"L={n}: {t:.6f}s" for n, t in zip(seq_lens, out)))
        return out


def prepare_data(cfg: RunConfig, rank: int, world: int) -> TrainData:
    d = cfg.data
    if d.prefix is None:
        if rank == 0:
            prepare_builtin_dataset(d.builtin_dir, vocab_size=d.builtin_vocab_size)
        ds.barrier()
        tokenizer_path, prefix = prepare_builtin_dataset(d.builtin_dir, vocab_size=d.builtin_vocab_size)
    else:
        tokenizer_path, prefix = d.tokenizer, d.prefix
    if not Path(tokenizer_path).exists():
        raise DatasetError(f"data.tokenizer {tokenizer_path}: no such file; give the tokenizer that preprocessed "
                           f"{prefix} (a sentencepiece .model, a tokenizer.json or its directory)")
    tokenizer = Tokenizer(str(tokenizer_path))
    dataset = IndexedDataset(str(prefix))
    check_vocab(dataset, tokenizer, str(prefix))
    try:
        model_config = model_config_for(cfg.model, tokenizer)
    except (ConfigError, DatasetError):
        raise
    except ValueError as e:  # the model's own checks, reported as a config error of the model section
        raise ConfigError(f"model section: {e}") from e
    return TrainData(cfg=cfg, prefix=str(prefix), tokenizer_path=str(tokenizer_path), tokenizer=tokenizer,
                     fingerprint=data_fingerprint(str(prefix)), model_config=model_config, rank=rank, world=world)


def model_config_for(m: ModelSection, tokenizer: Tokenizer) -> ModelConfig:
    """The run's ModelConfig: the preset with the section's settings, or the architecture of model.init_from_hf's
    config.json (read only; its weights are loaded by build_model)."""
    runtime = dict(attention=m.attention, activation_checkpointing=m.activation_checkpointing,
                   document_masking=m.document_masking, reset_position_ids=m.reset_position_ids)
    if not m.init_from_hf:
        overrides = {**m.overrides, **runtime}
        for key in ("family", "rotary_pct", "rope_base"):
            if getattr(m, key) is not None:
                overrides[key] = getattr(m, key)
        return ModelConfig.from_preset(m.preset, vocab_size=tokenizer.vocab_size, **overrides)
    from model.hf import read_hf_config
    fixed = [k for k in ("rotary_pct", "rope_base", "overrides") if getattr(m, k)]
    if fixed:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: the architecture comes from its config.json; "
                          f"drop model.{', model.'.join(fixed)}")
    try:
        config = read_hf_config(m.init_from_hf, **runtime)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: no config.json there; give a Hugging Face "
                          f"GPT-NeoX or Llama directory (save_pretrained's layout)") from None
    except ValueError as e:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: {e}") from None
    if m.family is not None and m.family != config.family:
        raise ConfigError(f"model.family={m.family} but model.init_from_hf {m.init_from_hf} holds a {config.family} "
                          f"model: drop model.family or point init_from_hf at a {m.family} directory")
    if config.vocab_size < tokenizer.vocab_size:
        raise DatasetError(f"model.init_from_hf {m.init_from_hf} has vocabulary {config.vocab_size} but the "
                           f"tokenizer {tokenizer.path} has {tokenizer.vocab_size}: give the checkpoint's own "
                           f"tokenizer as data.tokenizer (and preprocess with it)")
    return config
