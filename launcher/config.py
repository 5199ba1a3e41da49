"""The run config: one dataclass per YAML section, every field documented and checked.

Load order: dataclass defaults < ``--config RUN.yaml`` < ``key=value`` overrides on the command line
(``growlength.tokens_per_step=8192``, values parsed as YAML). Unknown keys are rejected with the list of
valid ones; problems that involve several fields are collected and raised together.
``python -m launcher.config`` prints every field with its default and help.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field, the value and the fix."""


def doc(help_text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with a one-line help text (shown by ``python -m launcher.config``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class DataConfig:
    prefix: str | None = doc("Megatron .bin/.idx prefix of the training corpus; null = the built-in corpus", None)
    tokenizer: str | None = doc("sentencepiece .model that made the data; null with prefix null = built-in", None)
    builtin_dir: str = doc("where the built-in corpus, tokenizer and dataset are prepared on first use",
                           ".cache/growlength/builtin")
    builtin_vocab_size: int = doc("vocabulary size of the built-in tokenizer", 8192)
    cache_dir: str | None = doc("where sample indices are cached; null = RUN_DIR/../.index-cache", None)
    valid_fraction: float = doc("share of documents held out for validation (document-level split)", 0.01)
    epochs: str = doc("when the plan needs more tokens than the data has: 'repeat' (reshuffled epochs) or 'error'",
                      "repeat")

    def __post_init__(self):
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.epochs not in ("repeat", "error"):
            raise ConfigError(f"data.epochs must be 'repeat' or 'error', got {self.epochs!r}")
        if (self.prefix is None) != (self.tokenizer is None):
            raise ConfigError("data.prefix and data.tokenizer go together: set both (your corpus and the "
                              "sentencepiece model that made it) or neither (the built-in corpus)")


@dataclass
class ModelSection:
    preset: str = doc("model preset: tiny, pythia-70m, pythia-160m, pythia-410m, pythia-1b (gpt-neox); tiny-llama, "
                      "smollm2-135m, smollm2-360m, tinyllama-1.1b (llama)", "tiny")
    family: str | None = doc("gpt-neox or llama; null = the preset's (a preset implies its family, and a different "
                             "value is an error)", None)
    attention: str = doc("attention backend: auto (flash-attn on CUDA when installed, else SDPA), flash, sdpa",
                         "auto")
    activation_checkpointing: bool = doc("recompute each block's activations in backward (long stages, big models)",
                                         False)
    rotary_pct: float | None = doc("share of each head's dims that are rotated (Pythia: 0.25, Llama: 1); "
                                   "null = preset", None)
    rope_base: float | None = doc("RoPE base (HF rope_theta); null = preset (10000; SmolLM2 100000)", None)
    overrides: dict = doc("any other ModelConfig fields, e.g. {num_layers: 4, hidden_size: 256, num_kv_heads: 2}",
                          factory=dict)
    init_from_hf: str | None = doc("start from a Hugging Face GPT-NeoX/Pythia or Llama directory instead of random "
                                   "init (its config.json replaces the preset)", None)


@dataclass
class GrowLengthConfig:
    stages: list = doc("stages shortest first: each {seq_len: N} plus one of tokens: N (absolute), share: F "
                       "(of total_tokens) or time_share: F (of the wall-clock)",
                       factory=lambda: [{"seq_len": 64, "share": 0.5}, {"seq_len": 128, "share": 0.3},
                                        {"seq_len": 256, "share": 0.2}])
    tokens_per_step: int = doc("global tokens per optimizer step, the same in every stage", 4096)
    total_tokens: int | None = doc("total token budget when stages give share or time_share", 1_048_576)
    grad_accum: int | None = doc("gradient accumulation per step in every stage; null = smallest that keeps "
                                 "micro_batch * seq_len <= max_tokens_per_micro_batch", 1)
    max_tokens_per_micro_batch: int | None = doc("memory cap on micro_batch * seq_len per rank; null = no cap", None)
    micro_batch_probe: str | None = doc("a launcher.bench_lengths JSON: each stage's micro-batch cap comes from the "
                                        "largest batch that fit at its length (needs grad_accum: null)", None)
    max_time_s: float | None = doc("stop (with a checkpoint) once the training wall-clock, summed over restarts, "
                                   "reaches this many seconds; for equal-time comparisons", None)

    def budget_kind(self) -> str:
        kinds = set()
        for i, s in enumerate(self.stages):
            if not isinstance(s, dict) or "seq_len" not in s:
                raise ConfigError(f"growlength.stages[{i}] must be a mapping with seq_len, got {s!r}")
            extra = set(s) - {"seq_len", "tokens", "share", "time_share"}
            if extra:
                raise ConfigError(f"growlength.stages[{i}] has unknown keys {sorted(extra)}; "
                                  f"valid: seq_len and one of tokens, share, time_share")
            given = [k for k in ("tokens", "share", "time_share") if k in s]
            if len(given) != 1:
                raise ConfigError(f"growlength.stages[{i}] must give exactly one budget (tokens, share or "
                                  f"time_share), got {given or 'none'}")
            kinds.add(given[0])
        if len(kinds) > 1:
            raise ConfigError(f"growlength.stages mix budget kinds {sorted(kinds)}: use one kind for all stages")
        return kinds.pop()

    def __post_init__(self):
        if not isinstance(self.stages, list) or not self.stages:
            raise ConfigError("growlength.stages must be a non-empty list, e.g. [{seq_len: 128, share: 1.0}]")
        kind = self.budget_kind()
        if kind != "tokens" and not self.total_tokens:
            raise ConfigError(f"growlength.stages give {kind} but growlength.total_tokens is not set")
        if self.micro_batch_probe and self.grad_accum is not None:
            raise ConfigError("growlength.micro_batch_probe chooses the accumulation per stage: set "
                              "growlength.grad_accum: null")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ConfigError(f"growlength.grad_accum must be >= 1 or null, got {self.grad_accum}")


@dataclass
class OptimConfig:
    warmup_fraction: float = doc("LR warmup as a share of all steps (fills the ds_config scheduler's "
                                 "warmup_num_steps); ignored when warmup_steps is set", 0.05)
    warmup_steps: int | None = doc("LR warmup in optimizer steps; null = warmup_fraction of all steps", None)

    def __post_init__(self):
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"optimisation.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class CheckpointConfig:
    interval_steps: int = doc("save every N optimizer steps (0 = only at stage ends, on signals and at the end)", 1000)
    keep_last: int = doc("how many complete checkpoints to keep (older ones are deleted)", 3)
    at_stage_end: bool = doc("save at the end of every stage", True)
    resume: str = doc("'auto' (newest complete checkpoint in RUN_DIR, if any), 'none', or a checkpoint path",
                      "auto")
    resume_force: bool = doc("resume even if the plan or data fingerprint differs (you own the consequences)",
                             False)

    def __post_init__(self):
        if self.keep_last < 1:
            raise ConfigError(f"checkpointing.keep_last must be >= 1, got {self.keep_last}")
        if self.interval_steps < 0:
            raise ConfigError(f"checkpointing.interval_steps must be >= 0, got {self.interval_steps}")


@dataclass
class LoggingConfig:
    log_interval: int = doc("print a step line every N steps", 10)
    eval_interval: int = doc("validate every N steps (0 = only at stage ends)", 1000)
    eval_tokens: int = doc("validation tokens per evaluated length (split over ranks)", 16384)
    eval_lengths: list = doc("extra lengths to validate at stage ends (the extrapolation curve)", factory=list)
    tensorboard: bool = doc("write TensorBoard event files under RUN_DIR/tensorboard", True)
    peak_tflops: float | None = doc("peak TFLOP/s per device for MFU; null = look up the GPU, else no MFU", None)

    def __post_init__(self):
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval must be >= 1, got {self.log_interval}")


@dataclass
class RunConfig:
    run_dir: str = doc("where metrics, logs and checkpoints go", "runs/tiny-demo")
    seed: int = doc("seeds model init and data order", 1234)
    data: DataConfig = doc("data section", factory=DataConfig)
    model: ModelSection = doc("model section", factory=ModelSection)
    growlength: GrowLengthConfig = doc("stage plan section", factory=GrowLengthConfig)
    optimisation: OptimConfig = doc("optimisation section (optimizer and scheduler types live in ds_config)",
                                    factory=OptimConfig)
    checkpointing: CheckpointConfig = doc("checkpoint section", factory=CheckpointConfig)
    logging: LoggingConfig = doc("logging section", factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)
            if f.default_factory is not dataclasses.MISSING}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "growlength.tokens_per_step", 8192)`` -> ``d["growlength"]["tokens_per_step"] = 8192``."""
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML (numbers, lists, null, booleans)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not key=value (e.g. growlength.tokens_per_step=8192)")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides" else v
    return out


def from_dict(tree: dict) -> RunConfig:
    """Build and check a :class:`RunConfig`; unknown keys anywhere are reported together."""
    if not isinstance(tree, dict):
        raise ConfigError(f"the run config must be a mapping of sections, got {type(tree).__name__}")
    sections = _section_types()
    unknown = [k for k in tree if k not in _field_names(RunConfig)]
    for name, cls in sections.items():
        sub = tree.get(name, {}) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"section {name} must be a mapping, got {sub!r}")
        unknown += [f"{name}.{k}" for k in sub if k not in _field_names(cls)]
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; see the valid ones with: python -m launcher.config")
    kwargs = {k: v for k, v in tree.items() if k not in sections}
    for name, cls in sections.items():
        kwargs[name] = cls(**(tree.get(name) or {}))
    return RunConfig(**kwargs)


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file; presets are in {Path(__file__).parent / 'configs'}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {e}") from e
    tree = _merge(tree, parse_overrides(list(overrides)))
    return from_dict(tree)


def describe_fields() -> str:
    """Every config field with its default and help text."""
    lines = []
    for f in dataclasses.fields(RunConfig):
        if f.default_factory is dataclasses.MISSING:
            lines.append(f"{f.name}: {f.default!r}  # {f.metadata['help']}")
    for name, cls in _section_types().items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {f.metadata['help']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(describe_fields() + "\n")
