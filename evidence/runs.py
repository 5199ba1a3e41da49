"""Reading what a training run left behind, for the evidence tools: metrics.jsonl as step, eval and stage records;
a run's tokenizer and data wherever the run directory now is (`find_tokenizer`, `find_data_prefix`); reports
written complete or not at all (`check_writable`, `write_json`, over `data_pipeline.atomic`); where a tool computes
(`compute_device`: --device / --dtype).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline import atomic
from data_pipeline.atomic import check_dir_writable
from data_pipeline.errors import UserError
from launcher.metrics import METRICS_FILE, MetricsError, read_metrics

if TYPE_CHECKING:
    from launcher.checkpoint import CheckpointState


class EvidenceError(UserError):
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
    try:
        records = read_metrics(path)
    except MetricsError as e:
        raise EvidenceError(str(e)) from None
    except OSError as e:
        raise EvidenceError(f"{metrics}: cannot read it ({e.strerror})") from None
    for record in records:
        kind = record.get("kind")
        {"eval": run.evals, "stage": run.stages}.get(kind, run.steps if kind is None else []).append(record)
    if not run.steps:
        raise EvidenceError(f"{metrics}: no step records; the run has not finished a training step yet")
    # a resumed run never repeats a step (the launcher truncates), but be robust to hand-merged files
    run.steps = sorted({r["step"]: r for r in run.steps}.values(), key=lambda r: r["step"])
    run.evals.sort(key=lambda r: r["step"])
    return run


# ---- where a tool computes ---------------------------------------------------------------------------------------
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_device(device: str = "auto", dtype: str = "auto"):
    """``(torch.device, torch.dtype)`` for a tool's ``--device`` and ``--dtype``: auto = CUDA in bf16 where CUDA is
    usable (fp32 on a GPU without bf16), else the CPU in fp32. A device or dtype that cannot be used here raises
    EvidenceError with the fix."""
    import torch

    usable = torch.cuda.is_available()
    if device == "auto":
        where = torch.device("cuda" if usable else "cpu")
    else:
        try:
            where = torch.device(device)
        except (RuntimeError, ValueError):
            where = None
        if where is None or where.type not in ("cpu", "cuda"):
            raise EvidenceError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
        if where.type == "cuda" and not usable:
            why = "this torch is built without CUDA" if torch.version.cuda is None else \
                "no GPU is visible, or the driver is older than this torch's CUDA " + str(torch.version.cuda)
            raise EvidenceError(f"--device {device}: CUDA is not usable here ({why}); use --device cpu")
        if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
            raise EvidenceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible; "
                                f"choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dtype == "auto":
        half = where.type == "cuda" and torch.cuda.is_bf16_supported()
        return where, torch.bfloat16 if half else torch.float32
    if dtype not in DTYPE_NAMES:
        raise EvidenceError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPE_NAMES)}")
    return where, getattr(torch, DTYPE_NAMES[dtype])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bf16" (the --dtype spelling)."""
    return {v: k for k, v in DTYPE_NAMES.items()}[str(dtype).replace("torch.", "")]


def add_device_arguments(parser, what: str = "compute") -> None:
    """The tools' shared --device / --dtype flags (checked by compute_device, not argparse: one line, exit 2)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when usable, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help=f"{what} dtype: auto (bf16 on CUDA, fp32 on the CPU) | "
                                                         f"{' | '.join(DTYPE_NAMES)}")


# ---- writing reports: complete or absent ------------------------------------------------------------------------
def check_writable(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a file where a directory is needed on the way
    to it, a directory where the file goes, or a place without write permission (probed by creating a file there)."""
    out = Path(path)
    if out.is_dir():
        raise EvidenceError(f"{flag} {path} is a directory; give a file name, e.g. {flag} {out / 'report.json'}")
    return check_dir_writable(out.parent, flag, path, EvidenceError)


def write_text(path: str | Path, text: str, flag: str = "--out") -> Path:
    """Write a text file atomically (a temporary name beside it, then a rename), creating its directory; an OS error
    is one line naming the path and ``flag``, the option that chose it."""
    try:
        atomic.write_text(path, text)
    except OSError as e:
        raise EvidenceError(f"{path}: cannot write it ({e.strerror}); choose another {flag}") from None
    return Path(path)


def write_json(path: str | Path, obj, flag: str = "--out") -> Path:
    """Write a report as JSON, atomically (a temporary name, then a rename), creating its directory."""
    return write_text(path, json.dumps(obj, indent=1), flag)


# ---- a run stands on its own: where its tokenizer and data are -------------------------------------------------
def run_dir_of(checkpoint: str | Path) -> Path:
    """RUN_DIR of a checkpoint directory (RUN_DIR/checkpoints/step_N), wherever the run directory now is."""
    return Path(checkpoint).resolve().parent.parent


def find_tokenizer(state: CheckpointState, checkpoint: str | Path, flag: str | None = None) -> str:
    """The tokenizer of a checkpoint: ``--tokenizer`` > the run's own copy (RUN_DIR/<tokenizer_in_run>) > the
    absolute path recorded at training (``tokenizer_resolved``) > the path as given then (``tokenizer``).
    Raises :class:`EvidenceError` naming every place looked at and the flag to point at it."""
    if flag:
        if not Path(flag).exists():
            raise EvidenceError(f"--tokenizer {flag}: no such file or directory")
        return str(flag)
    in_run = state.tokenizer_in_run
    candidates = ([str(run_dir_of(checkpoint) / in_run)] if in_run else []) + [state.tokenizer_resolved,
                                                                                state.tokenizer]
    found = next((c for c in candidates if Path(c).exists()), None)
    if found is None:
        raise EvidenceError(f"{checkpoint}: the tokenizer it was trained with is not found (looked at "
                            f"{', '.join(dict.fromkeys(candidates)) or 'nothing: no path recorded'}); point at it "
                            f"with --tokenizer PATH")
    return found


def _has_data(prefix: str) -> bool:
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()


def find_data_prefix(state: CheckpointState | None, checkpoint: str | Path, flag: str | None = None) -> str:
    """The training data of a checkpoint: ``--data-prefix`` > the absolute prefix recorded at training
    (``data_prefix_resolved``) > the prefix as given then (``data_prefix``); PREFIX.bin and PREFIX.idx must exist."""
    if flag:
        if not _has_data(flag):
            missing = next(ext for ext in (".bin", ".idx") if not Path(flag + ext).is_file())
            raise EvidenceError(f"--data-prefix {flag}: {flag + missing} not found; give the PREFIX of a "
                                f"PREFIX.bin/PREFIX.idx pair (python -m data_pipeline.preprocess makes one)")
        return flag
    candidates = [state.data_prefix_resolved, state.data_prefix] if state else []
    found = next((c for c in candidates if _has_data(c)), None)
    if found is None:
        raise EvidenceError(f"{checkpoint}: the training data is not found (looked for PREFIX.bin/.idx at "
                            f"{', '.join(dict.fromkeys(candidates)) or 'nothing: no prefix recorded'}); point at it "
                            f"with --data-prefix PREFIX")
    return found
