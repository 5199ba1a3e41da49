"""Downstream evaluation with lm-evaluation-harness on a run or a Hugging Face directory.

    python -m evidence.downstream --checkpoint RUN [--tasks hellaswag,arc_easy | --tasks PATH.yaml] [--limit N]

A launcher checkpoint (RUN_DIR, RUN_DIR/checkpoints or one step_NNNNNNNN) is exported with evidence.export_hf to a
temporary Hugging Face directory, removed afterwards; a directory holding config.json is evaluated as it is. The
harness's own Hugging Face backend runs it (float32 on the CPU unless --device says otherwise). --tasks takes harness
task names, or task YAML files / directories of them (local JSON datasets work offline: `dataset_path: json`).
Writes RUN_DIR/downstream/step_NNNNNNNN.json (the harness's results, the task configs, the checkpoint's step and
tokens) and the harness's markdown table beside it as .md (--log-samples: every document's responses as
.samples.json), or --out PREFIX.json/.md; each atomically.
Needs `pip install 'growlength[eval]'`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from data_pipeline.errors import UserError
from evidence.runs import EvidenceError, check_writable, write_text
from launcher import checkpoint as ckpt

log = logging.getLogger("growlength")
INSTALL_HINT = "pip install 'growlength[eval]'"


def parse_tasks(text: str) -> tuple[list[str], list[str]]:
    """``(task names, include paths)`` of --tasks: comma-separated harness task names and/or YAML task files or
    directories of them (a file's tasks are the ``task:`` names it defines)."""
    import yaml
    names, include = [], []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        path = Path(item)
        if item.endswith((".yaml", ".yml")) or path.is_dir():
            if not path.exists():
                raise EvidenceError(f"--tasks {item}: no such file")
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            for f in files:
                try:
                    config = yaml.load(f.read_text(), Loader=yaml.BaseLoader)  # `!function` tags stay text
                except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                    raise EvidenceError(f"--tasks {f}: not a readable YAML task file ({e})") from None
                if not isinstance(config, dict) or not isinstance(config.get("task"), str):
                    raise EvidenceError(f"--tasks {f}: a task file names its task in a `task:` field (see the "
                                        f"harness's docs/task_guide.md)")
                names.append(config["task"])
            include.append(str(path.resolve() if path.is_dir() else path.resolve().parent))
        else:
            names.append(item)
    if not names:
        raise EvidenceError(f"--tasks {text!r}: no task given; e.g. --tasks hellaswag,arc_easy or --tasks my_task.yaml")
    return names, include


def resolve_model(checkpoint: str, tmp: Path) -> tuple[Path, dict | None, Path | None]:
    """``(HF directory, checkpoint state or None, checkpoint dir or None)``; a launcher checkpoint is exported into
    ``tmp``."""
    from evidence.export_hf import export, find_checkpoint
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        return path, None, None
    found, state = find_checkpoint(path)
    return export(str(found), str(tmp / "hf")), state, found


def evaluate(hf_dir: Path, tasks: list[str], include: list[str], limit: float | None, batch_size: int, device: str,
             bootstrap_iters: int, log_samples: bool = False) -> dict:
    """Run the harness's ``simple_evaluate`` on ``hf_dir``; returns its results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvidenceError(f"evidence.downstream needs lm-evaluation-harness ({e}); {INSTALL_HINT}") from None
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvidenceError(f"--tasks: unknown to the harness: {unknown}; list them with `lm-eval ls tasks`, or give "
                            f"a task YAML file")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": device},
        tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples)
    return results


def report_paths(out: str | None, found: Path | None, state: ckpt.CheckpointState | None) -> tuple[Path, Path]:
    if out:
        base = Path(out)
        base = base.with_suffix("") if base.suffix in (".json", ".md") else base
    elif found is not None:
        base = found.parent.parent / "downstream" / f"step_{state.step:08d}"
    else:
        raise EvidenceError("--out is required for a Hugging Face directory (a run's reports go to "
                            "RUN_DIR/downstream/)")
    return base.with_suffix(".json"), base.with_suffix(".md")


def run(checkpoint: str, tasks: str, limit: float | None = None, out: str | None = None, batch_size: int = 8,
        device: str = "cpu", bootstrap_iters: int = 100000, log_samples: bool = False) -> tuple[Path, Path, dict]:
    """Export (if needed), evaluate and write the JSON and markdown reports; returns their paths and the results."""
    if limit is not None and limit <= 0:
        raise EvidenceError(f"--limit {limit}: must be positive (documents per task, a fraction when < 1)")
    if batch_size < 1 or bootstrap_iters < 0:
        raise EvidenceError(f"--batch-size {batch_size} --bootstrap-iters {bootstrap_iters}: the batch size must be at "
                            f"least 1 and the bootstrap resamples at least 0")
    names, include = parse_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="growlength-downstream-") as tmp:
        hf_dir, state, found = resolve_model(checkpoint, Path(tmp))
        json_path, md_path = report_paths(out, found, state)
        check_writable(json_path)
        results = evaluate(hf_dir, names, include, limit, batch_size, device, bootstrap_iters, log_samples)
    from lm_eval.utils import make_table
    source = {"checkpoint": str(found) if found else str(hf_dir), "step": state.step if state else None,
              "tokens_seen": state.tokens_seen if state else None, "tasks": names, "limit": limit}
    report = {"source": source, "results": results["results"], "versions": results.get("versions", {}),
              "n-shot": results.get("n-shot", {}), "configs": results.get("configs", {})}
    write_text(json_path, json.dumps(report, indent=1, default=str) + "\n")
    head = f"# Downstream: {source['checkpoint']}" + (f" (step {state.step}, {state.tokens_seen:,} tokens)"
                                                      if state else "")
    write_text(md_path, f"{head}\n\n{make_table(results)}")
    if log_samples:  # each document with the model's answer to every request (loglikelihood, greedy or not)
        write_text(json_path.with_suffix(".samples.json"), json.dumps(results["samples"], default=str) + "\n")
    return json_path, md_path, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evidence.downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/checkpoints, one step_NNNNNNNN, or a "
                   "Hugging Face directory (evidence.export_hf --out)")
    p.add_argument("--tasks", default="hellaswag,arc_easy", help="harness task names and/or task YAML files or "
                   "directories, comma-separated (default hellaswag,arc_easy)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--out", help="report prefix: writes OUT.json and OUT.md (default RUN_DIR/downstream/step_N)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="torch device for the harness (cpu, cuda, cuda:1)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="the harness's bootstrap resamples for "
                   "standard errors (0 = none)")
    p.add_argument("--log-samples", action="store_true", help="also write OUT.samples.json: every document with "
                   "the model's response to each request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        json_path, md_path, _ = run(args.checkpoint, args.tasks, args.limit, args.out, args.batch_size, args.device,
                                    args.bootstrap_iters, args.log_samples)
    except (UserError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    log.info("wrote %s and %s", json_path, md_path)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
