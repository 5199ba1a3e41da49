"""Reading what a training run left behind, for the evidence tools (evaluate, plot, compare).

The tools read only ``RUN_DIR/metrics.jsonl`` (DESIGN.md "metrics.jsonl") and checkpoints; this module turns the
former into step, eval and stage records and checks user-given lengths, with errors that name the file and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from launcher.metrics import METRICS_FILE


class EvidenceError(ValueError):
    """Bad input to an evidence tool (a run directory, a length list, a checkpoint); the message says the fix."""


def parse_lengths(text: str, flag: str = "--lengths") -> list[int]:
    """``"128,256, 512"`` -> ``[128, 256, 512]`` (sorted, unique); zero, negative or non-integer values are refused."""
    lengths, bad = [], []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            bad.append(item)
            continue
        if value <= 0:
            bad.append(item)
        lengths.append(value)
    if bad:
        raise EvidenceError(f"{flag} {text!r}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a positive "
                            f"integer; give sequence lengths in tokens, e.g. {flag} 128,256,512")
    if not lengths:
        raise EvidenceError(f"{flag} is empty; give sequence lengths in tokens, e.g. {flag} 128,256,512")
    return sorted(set(lengths))


@dataclass
class Run:
    """One run directory's metrics, split by record kind."""

    path: Path
    name: str
    steps: list[dict] = field(default_factory=list)   # step records, by step
    evals: list[dict] = field(default_factory=list)   # "kind": "eval"
    stages: list[dict] = field(default_factory=list)  # "kind": "stage" (one per stage entered, resumes included)

    def eval_lengths(self) -> list[int]:
        return sorted({int(k.rsplit("_", 1)[1]) for r in self.evals for k in r if k.startswith("val_loss_")})

    def stage_starts(self) -> list[dict]:
        """The first stage record of each stage (a resume mid-stage writes another; the first one counts)."""
        first: dict[int, dict] = {}
        for r in self.stages:
            first.setdefault(r["stage"], r)
        return [first[k] for k in sorted(first)]

    @property
    def final(self) -> dict:
        return self.steps[-1]


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Parse RUN_DIR/metrics.jsonl; raises :class:`EvidenceError` when the directory or its metrics are missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise EvidenceError(f"{run_dir}: no such run directory; give the run_dir a training wrote")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise EvidenceError(f"{run_dir}: no {METRICS_FILE} in this directory; is it a run directory "
                            f"(launcher/pretrain.py run_dir=...) and did the run get past its first step?")
    run = Run(path=path, name=name or path.name)
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvidenceError(f"{metrics}:{n}: not a JSON line ({e})") from None
        kind = record.get("kind")
        {"eval": run.evals, "stage": run.stages}.get(kind, run.steps if kind is None else []).append(record)
    if not run.steps:
        raise EvidenceError(f"{metrics}: no step records; the run has not finished a training step yet")
    # a resumed run never repeats a step (the launcher truncates), but be robust to hand-merged files
    run.steps = sorted({r["step"]: r for r in run.steps}.values(), key=lambda r: r["step"])
    run.evals.sort(key=lambda r: r["step"])
    return run


def write_json(path: str | Path, obj) -> Path:
    """Write a report as JSON, atomically (a temporary name, then a rename), creating its directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(out)
    return out
