"""Experiment trackers beside metrics.jsonl: Weights & Biases (``logging.wandb``).

A tracker is a sink of :class:`launcher.metrics.MetricsWriter`: it receives exactly the records metrics.jsonl gets
(steps, evals by length and source, stage switches, throughput, MFU), on rank 0 only, and the run config and the
stage plan once at start. Its W&B run id is kept in RUN_DIR/wandb/run_id, so a restarted run (resume, requeue)
logs into the same W&B run. ``mode: offline`` writes RUN_DIR/wandb/offline-run-*/ for ``wandb sync`` from a
machine with internet. The ``wandb`` package is optional (``pip install 'growlength[wandb]'``).
"""
from __future__ import annotations

import importlib.util
import logging
import secrets
import string
from pathlib import Path

from data_pipeline.atomic import write_text

log = logging.getLogger("growlength")

WANDB_MODES = ("online", "offline", "disabled")
WANDB_KEYS = {"project": "the W&B project", "name": "the run's display name (default: the run_dir's name)",
              "mode": "online, offline (sync later with `wandb sync`) or disabled", "entity": "team or user",
              "group": "group of runs", "tags": "list of tags"}
INSTALL_HINT = "pip install 'growlength[wandb]'"


def wandb_problems(settings: dict | None) -> list[str]:
    """What is wrong with a ``logging.wandb`` mapping ([] when usable, or when absent)."""
    if settings is None:
        return []
    unknown = sorted(set(settings) - set(WANDB_KEYS))
    problems = [f"logging.wandb: unknown keys {unknown}; valid: {', '.join(WANDB_KEYS)}"] if unknown else []
    mode = settings.get("mode", "online")
    if mode not in WANDB_MODES:
        problems.append(f"logging.wandb.mode must be {' or '.join(WANDB_MODES)}, got {mode!r}")
    for key in ("project", "name", "entity", "group"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            problems.append(f"logging.wandb.{key} must be a string, got {settings[key]!r}")
    tags = settings.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append(f"logging.wandb.tags must be a list of strings, got {tags!r}")
    if mode != "disabled" and not settings.get("project"):
        problems.append("logging.wandb.project is required (e.g. logging.wandb.project=growlength), or set "
                        "logging.wandb.mode=disabled")
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        problems.append(f"logging.wandb: the wandb package is not installed; {INSTALL_HINT} (or remove "
                        f"logging.wandb)")
    return problems


def flatten(record: dict) -> dict:
    """A metrics record as W&B scalars: ``{"<kind>/<key>": number}``, nested mappings (``tokens_by_source``) one
    key per entry; ``step``, ``kind``, text and nulls (MFU on an unknown GPU) left out."""
    kind = record.get("kind", "train")
    out = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = value
    for key, value in record.items():
        if key not in ("step", "kind"):
            add(f"{kind}/{key}", value)
    return out


class WandbSink:
    """Logs metrics records to one W&B run (rank 0 only: built by the rank-0 MetricsWriter)."""

    def __init__(self, settings: dict, run_dir: str | Path, config: dict):
        import wandb
        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        run_id = _run_id(run_dir / "wandb" / "run_id")
        self.run = wandb.init(
            project=settings.get("project"), entity=settings.get("entity"), group=settings.get("group"),
            name=settings.get("name") or run_dir.resolve().name, tags=settings.get("tags") or None,
            mode=settings.get("mode", "online"), dir=str(run_dir), id=run_id, resume="allow", config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False))
        where = f"; sync it with: wandb sync {self.run.dir and Path(self.run.dir).parent}" \
            if settings.get("mode") == "offline" else ""
        log.info("W&B run %s (%s, project %s)%s", run_id, settings.get("mode", "online"), settings.get("project"),
                 where)

    def log(self, record: dict) -> None:
        # W&B's step is the trainer's step; records of one step (its eval, the next stage's start) share it
        self.run.log(flatten(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _run_id(path: Path) -> str:
    """The W&B run id of this run directory: read, or made (8 random characters, as W&B's own ids) and written
    atomically on the first start."""
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text(path, run_id + "\n")
    return run_id
