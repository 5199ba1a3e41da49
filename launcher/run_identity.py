"""Which run-config fields are part of a run's identity: a resume that changes one is refused, naming the field, both
values and the fix; the others (where files go, how often to log or save, how the kernels run) may change.

Every field of :class:`launcher.config.RunConfig` is in :data:`FIELDS` (``tests/launcher/test_run_identity.py``
fails on one that is not), classified by what the training loop computes with:

- ``run``: compared here, value against value (:func:`config_differences`);
- ``model``: compared in the built model (``checkpoint.model_identity``), since a preset and its overrides can
  spell one architecture two ways;
- ``plan``: decides the stage plan, compared through its fingerprint (lengths, steps, micro-batches);
- ``data``: decides the training tokens, compared through the data fingerprint;
- ``runtime``: may change on a resume.
"""
from __future__ import annotations

import dataclasses
import json

RUN, MODEL, PLAN, DATA, RUNTIME = "run", "model", "plan", "data", "runtime"

FIELDS: dict[str, tuple[str, str]] = {
    "run_dir": (RUNTIME, "where the run lives; a moved run directory resumes"),
    "seed": (RUN, "seeds the data order"),
    "data.prefix": (DATA, "the training corpus"),
    "data.tokenizer": (DATA, "the tokenizer that made the corpus"),
    "data.builtin_dir": (RUNTIME, "where the built-in corpus is prepared (its content is fingerprinted)"),
    "data.builtin_vocab_size": (DATA, "the built-in corpus's tokens"),
    "data.cache_dir": (RUNTIME, "where sample indices are cached"),
    "data.valid_fraction": (RUN, "changes which documents train"),
    "data.epochs": (RUN, "changes the data order"),
    "data.sources": (DATA, "the training corpora of a mixture and their weights"),
    "model.preset": (MODEL, "the architecture"),
    "model.compile": (RUNTIME, "how the blocks execute"),
    "model.init_from_hf": (MODEL, "where the initial weights came from"),
    **{f"model.{name}": (MODEL, "the architecture, or what a position or a token means to it") for name in (
        "hidden_size", "num_layers", "num_heads", "family", "num_kv_heads", "intermediate_size", "rotary_pct",
        "rope_base", "rope_scaling", "rope_scaling_factor", "use_parallel_residual", "tie_word_embeddings",
        "layer_norm_eps", "document_masking", "reset_position_ids", "init_std", "output_init_std",
        "vocab_pad_multiple", "z_loss")},
    **{f"model.{name}": (RUNTIME, "how the kernels execute, not what they compute") for name in (
        "attention", "deterministic_attention", "activation_checkpointing")},
    **{f"growlength.{name}": (PLAN, "the stage plan") for name in (
        "stages", "tokens_per_step", "total_tokens", "grad_accum", "max_tokens_per_micro_batch",
        "micro_batch_probe")},
    "growlength.max_time_s": (RUNTIME, "a wall-clock budget may be extended"),
    "optimisation.warmup_fraction": (RUN, "moves the learning rate mid-run"),
    "optimisation.warmup_steps": (RUN, "moves the learning rate mid-run"),
    **{f"schedule.{name}": (RUN, "moves the learning rate mid-run") for name in (
        "type", "warmup", "decay", "decay_from_stage", "decay_shape", "min_lr_ratio")},
    **{f"checkpointing.{name}": (RUNTIME, "when and how checkpoints are saved and chosen") for name in (
        "interval_steps", "keep_last", "at_stage_end", "resume", "resume_force", "start_over")},
    **{f"logging.{name}": (RUNTIME, "what is measured and reported, not what trains") for name in (
        "log_interval", "eval_interval", "eval_tokens", "eval_lengths", "tensorboard", "peak_tflops", "wandb",
        "downstream_tasks", "downstream_limit")},
}


def config_fields() -> list[str]:
    """Every field of RunConfig, dotted (``data.valid_fraction``), sections walked."""
    from launcher.config import RunConfig

    def walk(cls, prefix: str) -> list[str]:
        names = []
        for f in dataclasses.fields(cls):
            section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if section is not None and dataclasses.is_dataclass(section):
                names += walk(section, f"{prefix}{f.name}.")
            else:
                names.append(prefix + f.name)
        return names
    return walk(RunConfig, "")


def runtime_model_fields() -> set[str]:
    """ModelConfig fields a resume may change (how the model executes)."""
    return {name.split(".", 1)[1] for name, (kind, _) in FIELDS.items()
            if name.startswith("model.") and kind == RUNTIME}


def _lookup(config: dict, name: str):
    for key in name.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def config_differences(saved: dict, current: dict, skip: set[str] = frozenset()) -> list[str]:
    """The ``run`` fields (but ``skip``) that differ between two ``RunConfig.to_dict()``s, each with both values and
    the fix."""
    diffs = []
    for name, (kind, why) in FIELDS.items():
        if name in skip:
            continue
        old, new = _lookup(saved, name), _lookup(current, name)
        if kind == RUN and old != new:
            diffs.append(f"{name}: {old!r} -> {new!r} ({why}; to continue this run set {name}={json.dumps(old)})")
    return diffs
