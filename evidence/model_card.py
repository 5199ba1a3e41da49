"""The training record of a Hugging Face export's model card: what a reader needs to trust the model. It follows
the card model/hf.py writes (what the model is, how its attention was trained) in README.md.

Built from the checkpoint's own state (model, step, tokens, the stage plan, the run config), the run's
metrics.jsonl (tokens each stage served per source, the last validation loss at each length) and the DeepSpeed
JSON the engine ran with (RUN_DIR/ds_config.resolved.json: optimizer and LR schedule). A part whose source is
missing (a moved run without metrics.jsonl) says so instead of being left out silently.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from launcher.checkpoint import CheckpointState
from launcher.metrics import MetricsError, read_metrics

VAL_KEY = re.compile(r"val_loss_(?:(?P<source>.+)_)?(?P<length>\d+)$")


def final_val_losses(records: list[dict]) -> list[tuple[str, int, float, int]]:
    """``(source or "", length, val_loss, step)``: the latest validation loss of each length (and source)."""
    latest: dict[tuple[str, int], tuple[float, int]] = {}
    for r in records:
        if r.get("kind") != "eval":
            continue
        for key, value in r.items():
            m = VAL_KEY.match(key)
            if m and isinstance(value, (int, float)):
                latest[(m.group("source") or "", int(m.group("length")))] = (value, r["step"])
    return [(src, length, loss, step) for (src, length), (loss, step) in sorted(latest.items())]


def tokens_by_source(records: list[dict]) -> dict[int, dict]:
    """Stage index -> {source: tokens served}, from the stage-end records that carry it."""
    return {r["stage"]: r["tokens_by_source"] for r in records
            if r.get("kind") == "stage" and isinstance(r.get("tokens_by_source"), dict)}


def _plan_table(plan: list[dict], tokens_per_step: int, by_source: dict[int, dict]) -> list[str]:
    rows = ["| stage | seq_len | micro-batch | accumulation | steps | tokens | share | tokens by source |",
            "|---|---|---|---|---|---|---|---|"]
    for s in plan:
        sources = by_source.get(s["index"])
        served = ", ".join(f"{k} {v:,}" for k, v in sources.items()) if sources else "-"
        rows.append(f"| {s['index']} | {s['seq_len']} | {s['micro_batch_size']} | {s['grad_accum']} | {s['steps']} "
                    f"| {s.get('tokens', s['steps'] * tokens_per_step):,} | {s.get('share', 0):.1%} | {served} |")
    return rows


def _schedule(state: CheckpointState, ds_config: dict | None) -> list[str]:
    optim = state.config.get("optimisation", {})
    lines = [f"- tokens per optimizer step: {state.tokens_per_step:,} (constant across stages), "
             f"{state.world_size} rank(s)"]
    if ds_config is None:
        return lines + ["- optimizer and LR schedule: unknown (RUN_DIR/ds_config.resolved.json is missing)"]
    for part in ("optimizer", "scheduler"):
        if part in ds_config:
            params = ", ".join(f"{k}={v}" for k, v in ds_config[part].get("params", {}).items())
            lines.append(f"- {part}: {ds_config[part].get('type')} ({params})")
    if optim:
        lines.append("- warm-up: " + ", ".join(f"{k}={v}" for k, v in optim.items()))
    return lines


def training_record(state: CheckpointState, run_dir: Path, checkpoint: Path) -> str:
    """The markdown sections (## Training ...) for the export of ``checkpoint``, appended to the model card."""
    try:
        records = read_metrics(run_dir)
        metrics_note = None if records else "metrics.jsonl is missing from the run directory"
    except (MetricsError, OSError) as e:
        records, metrics_note = [], f"metrics.jsonl is unreadable ({e})"
    ds_path = run_dir / "ds_config.resolved.json"
    ds_config = json.loads(ds_path.read_text()) if ds_path.is_file() else None
    plan = state.plan
    lengths = " -> ".join(str(s["seq_len"]) for s in plan)
    lines = ["", "## Training", "",
             f"Run `{run_dir.name}`, checkpoint `{checkpoint.name}`: step {state.step:,}, "
             f"{state.tokens_seen:,} tokens, sequence length grown {lengths}.", "",
             "### Stage plan", "", *_plan_table(plan, state.tokens_per_step, tokens_by_source(records)), "",
             f"Plan fingerprint `{state.plan_fingerprint}`; data fingerprint `{state.data_fingerprint}`, data "
             f"`{state.data_prefix}`.", "",
             "### Schedule", "", *_schedule(state, ds_config), "", "### Final validation loss", ""]
    losses = final_val_losses(records)
    if losses:
        lines += ["| source | length | val_loss | perplexity | at step |", "|---|---|---|---|---|"]
        lines += [f"| {src or 'all'} | {length} | {loss:.4f} | {math.exp(loss):,.1f} | {step} |"
                  for src, length, loss, step in losses]
    else:
        lines.append(f"No validation records ({metrics_note or 'the run logged no eval'}).")
    return "\n".join(lines) + "\n"
