"""The run config: one dataclass per YAML section, every field documented and checked.

Load order: dataclass defaults < ``--config RUN.yaml`` < ``key=value`` overrides on the command line
(``growlength.tokens_per_step=8192``, values parsed as YAML). Unknown keys are rejected with the list of
valid ones; problems that involve several fields are collected and raised together.
``python -m launcher.config`` prints every field with its default and help.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.errors import UserError
from model.config import PRESETS, ModelConfig


class ConfigError(UserError):
    """A run config that cannot be used; the message names the field, the value and the fix."""


def doc(help_text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, **bounds):
    """A dataclass field with a one-line help text (shown by ``python -m launcher.config``).

    ``bounds`` (``ge``, ``gt``, ``le``, ``lt``, ``choices``) restrict the value, or each element of a list; the
    type comes from the annotation (``expect`` rewords it in messages). Both are checked by :func:`field_problems`
    when the section is built."""
    meta = {"help": help_text, **bounds}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def _kind(value: Any) -> str:
    """What YAML made of a value, in the user's words."""
    for tp in (bool, int, float, str, list, dict):
        if isinstance(value, tp):
            return _TYPE_NAMES[tp] if tp is not bool else "a boolean"
    return "null" if value is None else type(value).__name__


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_expected(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if typing.get_origin(tp) is list and typing.get_args(tp):
        return f"a list of {_expected(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return _TYPE_NAMES.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _hint(value: Any, tp: Any) -> str:
    """Why YAML may have produced this value, when that is the likely cause."""
    if isinstance(value, str):
        if value.lower() in ("true", "false") and tp is bool:
            return " (a quoted string: write true or false without quotes)"
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string: remove the quotes)"
    if isinstance(value, bool) and tp is str:
        return " (YAML reads yes/no/on/off/true/false as booleans: quote the value)"
    if isinstance(value, float) and (tp is int or int in typing.get_args(tp)):
        return (f" (an exponent makes a float: write {int(value)})" if value.is_integer() and abs(value) < 1e18
                else " (write a whole number)")
    return ""


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, typing.get_origin(tp) or tp)


def _bounds_text(meta: dict, optional: bool) -> str:
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = (meta["le"], "]") if "le" in meta else (meta["lt"], ")") if "lt" in meta else None
    if lo and hi:
        text = f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    elif lo:
        text = f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    else:
        text = f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return text + (" or null" if optional else "")


def _in_bounds(value: Any, meta: dict) -> bool:
    return not (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
                or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"]))


def check_value(path: str, value: Any, tp: Any, meta: dict | None = None) -> list[str]:
    """Problems of one value against a type annotation (int, float, bool, str, list, list[X], dict, X | None) and
    optional bounds; [] when it fits. Sections (dataclasses) check themselves."""
    meta = meta or {}
    if dataclasses.is_dataclass(tp):
        return []
    optional = False
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if value is None and optional:
            return []
        tp = args[0]
    if not _type_ok(value, tp):
        expected = meta.get("expect") or _expected(tp) + (" or null" if optional else "")
        return [f"{path} must be {expected}, got {value!r}{_hint(value, tp)}"]
    if typing.get_origin(tp) is list and typing.get_args(tp):
        return [p for i, v in enumerate(value) for p in check_value(f"{path}[{i}]", v, typing.get_args(tp)[0], meta)]
    if "choices" in meta and value not in meta["choices"]:
        return [f"{path} must be {' or '.join(map(repr, meta['choices']))}, got {value!r}"]
    if any(k in meta for k in ("ge", "gt", "le", "lt")) and not _in_bounds(value, meta):
        return [f"{path} must be {_bounds_text(meta, optional)}, got {value!r}"]
    return []


def field_problems(obj: Any, where: str) -> tuple[list[str], set[str]]:
    """Every field of the dataclass ``obj`` checked against its annotation and bounds (see :func:`doc`):
    ``(problems, names of the fields that have one)``."""
    hints = typing.get_type_hints(type(obj))
    prefix = f"{where}." if where else ""
    problems, failed = [], set()
    for f in dataclasses.fields(obj):
        found = check_value(prefix + f.name, getattr(obj, f.name), hints[f.name], dict(f.metadata))
        if found:
            problems += found
            failed.add(f.name)
    return problems, failed


class Section:
    """Base of the config sections: on construction every field is checked against its annotation, then the
    section's own (cross-field) rules in :meth:`problems` on the fields that passed; all problems are raised
    together."""

    SECTION = ""  # the YAML section name, for messages

    def __post_init__(self):
        problems, failed = field_problems(self, self.SECTION)
        problems += self.problems(failed)
        if problems:
            raise ConfigError("\n  ".join(problems))

    def problems(self, failed: set[str]) -> list[str]:
        """Rules beyond each field's type and bounds; ``failed`` names the fields whose type is wrong (skip them)."""
        return []


@dataclass
class DataConfig(Section):
    SECTION = "data"
    prefix: str | None = doc("Megatron .bin/.idx prefix of the training corpus; null = the built-in corpus", None)
    tokenizer: str | None = doc("the tokenizer that made the data: a sentencepiece .model, an HF tokenizer.json "
                                "or its directory; null with prefix null = built-in", None)
    builtin_dir: str = doc("where the built-in corpus, tokenizer and dataset are prepared on first use",
                           ".cache/growlength/builtin")
    builtin_vocab_size: int = doc("vocabulary size of the built-in tokenizer", 8192, ge=1)
    cache_dir: str | None = doc("where sample indices are cached; null = RUN_DIR/../.index-cache", None)
    valid_fraction: float = doc("share of documents held out for validation (document-level split)", 0.01,
                                ge=0, lt=1)
    epochs: str = doc("when the plan needs more tokens than the data has: 'repeat' (reshuffled epochs) or 'error'",
                      "repeat", choices=("repeat", "error"))
    sources: object = doc("a mixture instead of prefix: [{name: web, prefix: data/web, weight: 0.7}, "
                                     "...] or Megatron's \"0.7 data/web 0.3 data/books\" (names = the prefixes' "
                                     "file names); all made by data.tokenizer", None)

    def problems(self, failed: set[str]) -> list[str]:
        if failed & {"prefix", "tokenizer"}:
            return []
        if self.sources is not None:
            if self.prefix is not None:
                return ["data.prefix and data.sources exclude each other: give one corpus as prefix, or a mixture "
                        "as sources"]
            if self.tokenizer is None:
                return ["data.sources needs data.tokenizer: the one tokenizer that made every source"]
            try:
                self.source_list()
            except ConfigError as e:
                return [str(e)]
            return []
        if (self.prefix is None) != (self.tokenizer is None):
            return ["data.prefix and data.tokenizer go together: set both (your corpus and the "
                    "sentencepiece model that made it) or neither (the built-in corpus)"]
        return []

    def source_list(self) -> list[tuple[str, str, float]]:
        """The mixture as [(name, prefix, weight)] in the given order (weights as given); [] without sources."""
        return parse_sources(self.sources) if self.sources is not None else []


def parse_sources(sources: list | str) -> list[tuple[str, str, float]]:
    """data.sources in either form, checked: unique names, positive finite weights. Raises ConfigError."""
    if isinstance(sources, str):
        sources = _megatron_data_path(sources)
    if not isinstance(sources, list) or not sources:
        raise ConfigError("data.sources must be a non-empty list of {name, prefix, weight} or a string "
                          "\"0.7 data/web 0.3 data/books\"")
    out = []
    for i, entry in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "prefix", "weight"}:
            raise ConfigError(f"{where} must be a mapping with exactly name, prefix and weight, got {entry!r}")
        name, prefix, weight = entry["name"], entry["prefix"], entry["weight"]
        if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "/" in name:
            raise ConfigError(f"{where}.name must be a non-empty word without spaces or '/', got {name!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"{where}.prefix must be a .bin/.idx prefix (a path without the extension), "
                              f"got {prefix!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ConfigError(f"{where}.weight must be a positive number, got {weight!r}")
        out.append((name, prefix, float(weight)))
    names = [n for n, _, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data.sources: names {dup} appear more than once; give each source its own name")
    return out


def _megatron_data_path(text: str) -> list[dict]:
    """Megatron's --data-path "W1 PREFIX1 W2 PREFIX2 ..." as sources named by each prefix's file name."""
    words = text.split()
    weights, prefixes = words[0::2], words[1::2]
    bad = next((w for w in weights if not _is_number(w)), None)
    if not words or len(words) % 2 or bad is not None:
        raise ConfigError(f"data.sources {text!r}: expected weight/prefix pairs like \"0.7 data/web 0.3 "
                          f"data/books\"" + (f"; {bad!r} is not a weight" if bad is not None else ""))
    return [{"name": Path(p).name, "prefix": p, "weight": float(w)} for w, p in zip(weights, prefixes)]


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


class _ModelRules(Section):
    """The rules of the `model:` section (its fields are made by :func:`_model_section`)."""

    SECTION = "model"

    def problems(self, failed: set[str]) -> list[str]:
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            return [f"model.compile must be true, false or auto, got {self.compile!r}"]
        return []

    def model_settings(self) -> dict:
        """The ModelConfig fields this section sets (the others keep the preset's, or init_from_hf's, value)."""
        return {name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None}


# the model's own fields, as model/config.py declares them (help, bounds); vocab_size comes from the tokenizer
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]


def _presets_by_family() -> str:
    """``tiny, pythia-70m, ... (gpt-neox); tiny-llama, ... (llama)``"""
    families = dict.fromkeys(p["family"] for p in PRESETS.values())
    return "; ".join(", ".join(n for n, p in PRESETS.items() if p["family"] == f) + f" ({f})" for f in families)


def _model_section() -> type:
    """The `model:` section: the launcher's keys (preset, compile, init_from_hf), then every ModelConfig field but
    vocab_size with its own help and bounds, optional here: null (the default) keeps the preset's value."""
    own = [
        ("preset", "str", doc(f"model preset: {_presets_by_family()}; the model fields below override its values "
                              f"(null: the preset's)", "tiny", choices=tuple(PRESETS))),
        ("compile", "object", doc("torch.compile the blocks, one static-shape graph per stage length built at the "
                                  "switch: true (a compiler failure stops the run), false, or auto (eager with a "
                                  "warning where it fails)", False)),
        ("init_from_hf", "str | None", doc("start from a Hugging Face GPT-NeoX/Pythia or Llama directory instead of "
                                           "random init (its config.json replaces the preset)", None)),
    ]
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    model = [(name, fields[name].type if "None" in fields[name].type else f"{fields[name].type} | None",
              field(default=None, metadata=fields[name].metadata)) for name in MODEL_FIELDS]
    return dataclasses.make_dataclass("ModelSection", own + model, bases=(_ModelRules,),
                                      namespace={"__module__": __name__})


ModelSection = _model_section()


# the keys of one growlength.stages entry: (type, bounds), checked like the fields
STAGE_KEYS = {"seq_len": (int, {"ge": 1}), "tokens": (int, {"ge": 1}), "share": (float, {"gt": 0, "le": 1}),
              "time_share": (float, {"gt": 0, "le": 1}), "max_tokens_per_micro_batch": (int, {"ge": 1}),
              "mixture": (dict, {})}
BUDGET_KEYS = ("tokens", "share", "time_share")


@dataclass
class GrowLengthConfig(Section):
    SECTION = "growlength"
    stages: list = doc("stages shortest first: each {seq_len: N} plus one of tokens: N (absolute), share: F "
                       "(of total_tokens) or time_share: F (of the wall-clock), and optionally "
                       "max_tokens_per_micro_batch: N (this stage's memory cap; needs grad_accum: null to "
                       "accumulate more instead)",
                       factory=lambda: [{"seq_len": 64, "share": 0.5}, {"seq_len": 128, "share": 0.3},
                                        {"seq_len": 256, "share": 0.2}])
    tokens_per_step: int = doc("global tokens per optimizer step, the same in every stage", 4096, ge=1)
    total_tokens: int | None = doc("total token budget when stages give share or time_share", 1_048_576, ge=1)
    grad_accum: int | None = doc("gradient accumulation per step in every stage; null = smallest that keeps "
                                 "micro_batch * seq_len <= max_tokens_per_micro_batch", 1, ge=1)
    max_tokens_per_micro_batch: int | None = doc("memory cap on micro_batch * seq_len per rank; null = no cap", None,
                                                 ge=1)
    micro_batch_probe: str | None = doc("a evidence.bench_lengths JSON: each stage's micro-batch cap comes from the "
                                        "largest batch that fit at its length (needs grad_accum: null)", None)
    max_time_s: float | None = doc("stop (with a checkpoint) once the training wall-clock, summed over restarts, "
                                   "reaches this many seconds; for equal-time comparisons", None, gt=0)

    def stage_problems(self) -> tuple[list[str], set[str]]:
        """Problems of the stage list, and the budget kinds it uses."""
        if not self.stages:
            return ["growlength.stages must be a non-empty list, e.g. [{seq_len: 128, share: 1.0}]"], set()
        problems, kinds = [], set()
        for i, s in enumerate(self.stages):
            where = f"growlength.stages[{i}]"
            if not isinstance(s, dict) or "seq_len" not in s:
                problems.append(f"{where} must be a mapping with seq_len, got {s!r}")
                continue
            extra = set(s) - set(STAGE_KEYS)
            if extra:
                problems.append(f"{where} has unknown keys {sorted(extra)}; valid: seq_len, one of tokens, "
                                f"share, time_share, and optionally max_tokens_per_micro_batch, mixture")
            given = [k for k in BUDGET_KEYS if k in s]
            if len(given) != 1:
                problems.append(f"{where} must give exactly one budget (tokens, share or time_share), "
                                f"got {given or 'none'}")
            else:
                kinds.add(given[0])
            for key in sorted(set(s) & set(STAGE_KEYS)):
                problems += check_value(f"{where}.{key}", s[key], *STAGE_KEYS[key])
        if len(kinds) > 1:
            problems.append(f"growlength.stages mix budget kinds {sorted(kinds)}: use one kind for all stages")
        return problems, kinds

    def budget_kind(self) -> str:
        problems, kinds = self.stage_problems()
        if problems:
            raise ConfigError("\n  ".join(problems))
        return kinds.pop()

    def problems(self, failed: set[str]) -> list[str]:
        if "stages" in failed:
            return []
        problems, kinds = self.stage_problems()
        if len(kinds) == 1 and kinds != {"tokens"} and "total_tokens" not in failed and not self.total_tokens:
            problems.append(f"growlength.stages give {kinds.pop()} but growlength.total_tokens is not set")
        if not failed & {"micro_batch_probe", "grad_accum"} and self.micro_batch_probe and self.grad_accum is not None:
            problems.append("growlength.micro_batch_probe chooses the accumulation per stage: set "
                            "growlength.grad_accum: null")
        return problems


@dataclass
class OptimConfig(Section):
    SECTION = "optimisation"
    warmup_fraction: float = doc("LR warmup as a share of all steps (fills the ds_config scheduler's "
                                 "warmup_num_steps); ignored when warmup_steps is set", 0.05, ge=0, lt=1)
    warmup_steps: int | None = doc("LR warmup in optimizer steps; null = warmup_fraction of all steps", None, ge=0)


@dataclass
class ScheduleConfig(Section):
    SECTION = "schedule"
    type: str = doc("learning-rate schedule: ds_config (the ds_config's scheduler section, step counts from "
                    "optimisation.warmup_*), or ours, counted in tokens: constant, cosine or wsd "
                    "(warmup-stable-decay); ours needs a ds_config without a scheduler section (docs/training.md)",
                    "ds_config", choices=("ds_config", "constant", "cosine", "wsd"))
    warmup: float = doc("linear warmup as a share of the run's tokens (ours)", 0.01, ge=0, lt=1)
    decay: float = doc("wsd: the decay's share of the run's tokens, at its end (ignored with decay_from_stage)", 0.2,
                       ge=0, le=1)
    decay_from_stage: int | None = doc("wsd: start the decay at the first step of this stage (0-based); null = "
                                       "use decay", None, ge=0)
    decay_shape: str = doc("wsd: linear, cosine or 1-sqrt, from the peak to min_lr_ratio * peak", "linear",
                           choices=("linear", "cosine", "1-sqrt"))
    min_lr_ratio: float = doc("the rate at the end of the decay, as a share of the peak (ours)", 0.0, ge=0, le=1)


@dataclass
class CheckpointConfig(Section):
    SECTION = "checkpointing"
    interval_steps: int = doc("save every N optimizer steps (0 = only at stage ends, on signals and at the end)", 1000,
                              ge=0)
    keep_last: int = doc("how many complete checkpoints to keep (older ones are deleted)", 3, ge=1)
    at_stage_end: bool = doc("save at the end of every stage", True)
    resume: str = doc("'auto' (newest complete checkpoint in RUN_DIR, if any), 'none', or a checkpoint path",
                      "auto", expect="auto, none or the path of a checkpoint or run directory")
    resume_force: bool = doc("resume even if the plan or data fingerprint differs (you own the consequences)",
                             False)
    start_over: bool = doc("move the run that run_dir holds aside to RUN_DIR.old-YYYYmmdd-HHMMSS and start this one "
                           "there (a run directory belongs to one run)", False)

    def problems(self, failed: set[str]) -> list[str]:
        if "resume" not in failed and self.resume not in ("auto", "none") and not Path(self.resume).exists():
            return [f"checkpointing.resume {self.resume!r}: no such file or directory; give auto (the newest "
                    f"complete checkpoint of run_dir), none (start fresh) or the path of a run directory or "
                    f"checkpoint"]
        return []


@dataclass
class LoggingConfig(Section):
    SECTION = "logging"
    log_interval: int = doc("print a step line every N steps", 10, ge=1)
    eval_interval: int = doc("validate every N steps (0 = only at stage ends)", 1000, ge=0)
    eval_tokens: int = doc("validation tokens per evaluated length (split over ranks)", 16384, ge=1)
    eval_lengths: list[int] = doc("extra lengths to validate at stage ends (the extrapolation curve)", factory=list,
                                  ge=1)
    tensorboard: bool = doc("write TensorBoard event files under RUN_DIR/tensorboard", True)
    peak_tflops: float | None = doc("peak TFLOP/s per device for MFU; null = look up the GPU, else no MFU", None,
                                    gt=0)
    wandb: dict | None = doc("Weights & Biases: {project: P, name: N, mode: online|offline|disabled, entity, group, "
                             "tags}; the metrics.jsonl records, config and plan, rank 0 (docs/trackers.md); null = off",
                             None)

    downstream_tasks: list[str] = doc("lm-evaluation-harness tasks (names or task YAML paths) to run on each stage-end "
                                      "checkpoint in the background (docs/tools.md#downstream); [] = none",
                                      factory=list)
    downstream_limit: float | None = doc("documents per downstream task (a fraction when < 1); null = all", None,
                                         gt=0)

    def problems(self, failed: set[str]) -> list[str]:
        import importlib.util
        from launcher.trackers import wandb_problems
        problems = [] if "wandb" in failed else wandb_problems(self.wandb)
        if self.downstream_tasks and "downstream_tasks" not in failed and importlib.util.find_spec("lm_eval") is None:
            problems.append("logging.downstream_tasks: lm-evaluation-harness is not installed; pip install "
                            "'growlength[eval]' (or set logging.downstream_tasks=[])")
        return problems


@dataclass
class RunConfig(Section):
    run_dir: str = doc("where metrics, logs and checkpoints go", "runs/tiny-demo")
    seed: int = doc("seeds model init and data order", 1234, ge=0, lt=2**32)
    data: DataConfig = doc("data section", factory=DataConfig)
    model: ModelSection = doc("model section", factory=ModelSection)
    growlength: GrowLengthConfig = doc("stage plan section", factory=GrowLengthConfig)
    optimisation: OptimConfig = doc("optimisation section (optimizer and scheduler types live in ds_config)",
                                    factory=OptimConfig)
    schedule: ScheduleConfig = doc("learning-rate schedule section (ds_config's, or ours: constant, cosine, wsd)",
                                   factory=ScheduleConfig)
    checkpointing: CheckpointConfig = doc("checkpoint section", factory=CheckpointConfig)
    logging: LoggingConfig = doc("logging section", factory=LoggingConfig)

    def problems(self, failed: set[str]) -> list[str]:
        problems = self.mixture_problems()
        if self.schedule.type != "ds_config" and self.optimisation.warmup_steps is not None:
            problems.append(f"optimisation.warmup_steps is {self.optimisation.warmup_steps} but schedule.type "
                            f"{self.schedule.type} takes its warmup from schedule.warmup (a share of the tokens); "
                            f"set optimisation.warmup_steps: null")
        if "run_dir" in failed:
            return problems
        run_dir = Path(self.run_dir)
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            problems.append(f"run_dir {self.run_dir}: {blocker} is a file, not a directory; choose another "
                            f"run_dir (or move the file away)")
        return problems

    def mixture_problems(self) -> list[str]:
        """Each stage's mixture names sources of data.sources, with non-negative weights not all zero."""
        names = [n for n, _, _ in self.data.source_list()]
        problems = []
        for i, stage in enumerate(self.growlength.stages):
            mix = stage.get("mixture") if isinstance(stage, dict) else None
            if mix is None:
                continue
            where = f"growlength.stages[{i}].mixture"
            if not names:
                problems.append(f"{where} needs data.sources (a mixture of named sources), not data.prefix")
                continue
            unknown = sorted(set(mix) - set(names))
            if unknown:
                problems.append(f"{where} names {unknown}, not in data.sources {names}")
            weights = list(mix.values())
            if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")
                   for w in weights) or not sum(weights) > 0:
                problems.append(f"{where} weights must be non-negative numbers, not all zero, got {mix!r}")
        return problems

    def stage_mixtures(self) -> list[dict[str, float]]:
        """Each stage's weights by source name: its own mixture (unnamed sources weigh 0), else data.sources'."""
        base = {n: w for n, _, w in self.data.source_list()}
        out = []
        for stage in self.growlength.stages:
            mix = stage.get("mixture")
            out.append({n: float(mix.get(n, 0.0)) for n in base} if mix is not None else dict(base))
        return out

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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently), and reading
    ``1e-6`` as a number (YAML 1.2; PyYAML's 1.1 rules need ``1.0e-6``)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.source}: key {key!r} is given twice (lines {seen[key]} and {line}); "
                                  f"keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str, source: str):
    """Parse run-config YAML text; ``source`` (a path, or the override) names it in errors."""
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML (numbers, lists, null, booleans)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not key=value (e.g. growlength.tokens_per_step=8192)")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"command-line override {item!r}")
        except yaml.YAMLError as e:
            raise ConfigError(f"command-line override {item!r}: the value is not valid YAML "
                              f"({str(e).splitlines()[0]}); quote it or fix the brackets") from None
        set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(tree: dict, source: str = "the run config") -> RunConfig:
    """Build and check a :class:`RunConfig`; unknown keys anywhere, and the problems of every section, are reported
    together."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must be a mapping of sections (run_dir:, data:, model:, growlength:, ...), "
                          f"got {_kind(tree)}")
    sections = _section_types()
    unknown = [k for k in tree if k not in _field_names(RunConfig)]
    for name, cls in sections.items():
        sub = tree.get(name, {}) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"section {name} must be a mapping, got {sub!r}")
        unknown += [f"{name}.{k}" for k in sub if k not in _field_names(cls)]
    if unknown:
        where = dict.fromkeys(k.split(".")[0] if "." in k else "" for k in unknown)
        valid = [f"{name or 'top-level'}: {', '.join(_field_names(sections[name] if name else RunConfig))}"
                 for name in where]
        raise ConfigError(f"unknown config keys {unknown}; see the valid ones with: python -m launcher.config "
                          f"(valid {'; '.join(valid)})")
    kwargs = {k: v for k, v in tree.items() if k not in sections}
    problems = []
    for name, cls in sections.items():
        try:
            kwargs[name] = cls(**(tree.get(name) or {}))
        except ConfigError as e:
            problems += [line.strip() for line in str(e).splitlines()]
    if not problems:
        try:
            return RunConfig(**kwargs)
        except ConfigError as e:
            problems += [line.strip() for line in str(e).splitlines()]
    else:  # the top-level fields too, so that one pass shows everything
        top = {k: v for k, v in kwargs.items() if k not in sections}
        problems += check_value_fields(RunConfig, top)
    raise ConfigError("\n  ".join(problems) if len(problems) == 1 else
                      f"{len(problems)} problems in the run config:\n  " + "\n  ".join(problems))


def check_value_fields(cls, values: dict) -> list[str]:
    """The type and bound problems of some of ``cls``'s fields, given as a dict (without building ``cls``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return [p for k, v in values.items() for p in check_value(k, v, hints[k], dict(fields[k].metadata))]


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    tree: dict = {}
    if path:
        p = Path(path)
        presets = Path(__file__).parent / "configs"
        if p.is_dir():
            raise ConfigError(f"--config {path} is a directory; give a YAML file, e.g. one of {presets}")
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file; presets are in {presets}")
        try:
            tree = load_yaml(p.read_text(encoding="utf-8"), f"--config {path}")
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: cannot read it ({e}); give a readable UTF-8 YAML file") from None
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path} must hold a mapping of sections (run_dir:, data:, model:, "
                              f"growlength:, ...), got {_kind(tree)}")
    tree = _merge(tree, parse_overrides(list(overrides)))
    return from_dict(tree, f"--config {path}" if path else "the run config")


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
