"""Figures from run directories: loss against tokens and wall-clock with stage boundaries (the paper's Figures 1-2),
perplexity against evaluation length (Figure 4).

    python -m evidence.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--labels a,b,...] [--val-length L]
        [--eval-json REPORT.json ...]

Reads only metrics.jsonl and evidence.evaluate reports; writes loss_vs_tokens.png, loss_vs_time.png and
ppl_vs_length.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from data_pipeline.atomic import atomic_path, check_dir_writable  # noqa: E402
from data_pipeline.errors import UserError  # noqa: E402
from evidence.runs import EvidenceError, Run, load_run  # noqa: E402

log = logging.getLogger("growlength")

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
X_AXES = {"tokens": ("tokens_seen", "tokens seen"), "time": ("elapsed_s", "training wall-clock")}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean over ``window`` points (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def common_val_length(runs: list[Run]) -> int | None:
    """The longest length that every run has at least one validation loss for."""
    shared = None
    for run in runs:
        lengths = set(run.eval_lengths())
        shared = lengths if shared is None else shared & lengths
    return max(shared) if shared else None


def time_unit(runs: list[Run]) -> tuple[float, str]:
    longest = max(r.final["elapsed_s"] for r in runs)
    return (60.0, "min") if longest > 600 else (1.0, "s")


def mark_stages(ax, run: Run, key: str, scale: float, color: str, row: int) -> None:
    """Dashed line at each stage switch, labelled with the new length (rows keep several runs' labels apart)."""
    for s in run.stage_starts()[1:]:
        x = s[key] / scale
        ax.axvline(x, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        ax.annotate(f"L={s['seq_len']}", xy=(x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12 - 12 * row), textcoords="offset points", fontsize=8, color=color,
                    ha="left", va="bottom")


def loss_figure(runs: list[Run], x: str, out: Path, val_length: int | None, extra_val: dict | None = None) -> Path:
    """Training loss (left) and validation loss at ``val_length`` (right) against tokens or wall-clock.

    ``extra_val``: optional {run name: [(tokens_seen, elapsed_s, loss), ...]} validation points from elsewhere
    (e.g. compare's checkpoint evaluations), drawn instead of the run's eval records."""
    key, label = X_AXES[x]
    scale, unit = time_unit(runs) if x == "time" else (1.0, "")
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        xs = [r[key] / scale for r in run.steps]
        losses = [r["loss"] for r in run.steps]
        window = max(1, len(losses) // 25)
        ax_t.plot(xs, losses, color=color, alpha=0.25, linewidth=0.8)
        ax_t.plot(xs, smooth(losses, window), color=color, linewidth=1.8, label=run.name)
        if extra_val and run.name in extra_val:
            pts = extra_val[run.name]
            vx = [(p[0] if x == "tokens" else p[1] / scale) for p in pts]
            vy = [p[2] for p in pts]
        else:
            evals = [r for r in run.evals if val_length and f"val_loss_{val_length}" in r]
            vx = [r[key] / scale for r in evals]
            vy = [r[f"val_loss_{val_length}"] for r in evals]
        if vx:
            ax_v.plot(vx, vy, "o-", color=color, linewidth=1.5, markersize=4, label=run.name)
        for ax in (ax_t, ax_v):
            mark_stages(ax, run, key, scale, color, i)
    xlabel = f"{label} ({unit})" if unit else label
    ax_t.set_title("training loss (running mean; raw faint)", fontsize=10)
    ax_v.set_title(f"validation loss at L={val_length}" if val_length else "validation loss (none recorded)",
                   fontsize=10)
    for ax in (ax_t, ax_v):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9, bbox_to_anchor=(1.0, 0.86))
    # room at the top for the stage labels of every run
    for ax in (ax_t, ax_v):
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + (hi - lo) * (0.08 + 0.06 * len(runs)))
    fig.suptitle(f"loss vs {label}; dashed lines: GrowLength stage switches (new length)", fontsize=11)
    return save_figure(fig, out)


def ppl_curves(runs: list[Run], reports: list[dict]) -> list[tuple[str, list[int], list[float], int | None]]:
    """``[(label, lengths, perplexities, longest trained length)]``: for one run, every evaluation with two or more
    lengths (the curve as training grows); for several, each run's last such evaluation; plus each report."""
    curves = []
    for run in runs:
        multi = [r for r in run.evals if sum(k.startswith("val_ppl_") for k in r) >= 2]
        trained = max((s["seq_len"] for s in run.stage_starts()), default=None)
        for r in (multi if len(runs) == 1 else multi[-1:]):
            lengths = sorted(int(k.rsplit("_", 1)[1]) for k in r if k.startswith("val_ppl_"))
            label = (f"{run.name} step {r['step']} (trained to L={r['seq_len']})" if len(runs) == 1
                     else f"{run.name} (final)")
            curves.append((label, lengths, [r[f"val_ppl_{L}"] for L in lengths],
                           r["seq_len"] if len(runs) == 1 else trained))
    for rep in reports:
        ok = [r for r in rep["results"] if "ppl" in r]
        name = Path(rep["checkpoint"]).parent.parent.name or rep["checkpoint"]  # RUN_DIR/checkpoints/step_N
        rope = "" if rep["rope_scaling"] == "none" else f", {rep['rope_scaling']} x{rep['rope_factor']:g}"
        curves.append((f"{name} step {rep['step']} (evaluate{rope})", [r["seq_len"] for r in ok],
                       [r["ppl"] for r in ok], rep.get("trained_seq_len")))
    return curves


def ppl_figure(curves, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    for i, (label, lengths, ppl, trained) in enumerate(curves):
        color = plt.cm.viridis(i / max(1, len(curves) - 1)) if len(curves) > 4 else COLORS[i % len(COLORS)]
        ax.plot(lengths, ppl, "o-", color=color, label=label, markersize=4)
        if trained:
            ax.axvline(trained, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("evaluation length (tokens, log scale)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("perplexity vs evaluation length; dotted: longest trained length", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Render to a temporary name beside ``out`` and rename: a reader never sees half a PNG."""
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    except OSError as e:
        raise EvidenceError(f"{out}: cannot write the figure ({e.strerror}); choose another --out") from None
    finally:
        plt.close(fig)
    return out


def plot_runs(run_dirs: list[str], out_dir: str, labels: list[str] | None = None, val_length: int | None = None,
              eval_reports: list[str] = (), extra_val: dict | None = None, run_ppl: bool = True) -> list[Path]:
    """Render the figures for ``run_dirs`` into ``out_dir``; returns the written PNG paths."""
    if not run_dirs:
        raise EvidenceError("give at least one RUN_DIR")
    if labels and len(labels) != len(run_dirs):
        raise EvidenceError(f"--labels has {len(labels)} names for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    reports = []
    for path in eval_reports:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise EvidenceError(f"--eval-json {path}: not a readable evidence.evaluate report ({e})") from None
        if not isinstance(report, dict) or not isinstance(report.get("results"), list):
            raise EvidenceError(f"--eval-json {path}: not a evidence.evaluate report (no results list); give the "
                                f"file that python -m evidence.evaluate --out wrote")
        reports.append(report)
    val_length = val_length or common_val_length(runs)
    out = Path(out_dir)
    check_dir_writable(out, "--out", error=EvidenceError)
    out.mkdir(parents=True, exist_ok=True)
    written = [loss_figure(runs, "tokens", out / "loss_vs_tokens.png", val_length, extra_val),
               loss_figure(runs, "time", out / "loss_vs_time.png", val_length, extra_val)]
    curves = ppl_curves(runs if run_ppl else [], reports)
    if curves:
        written.append(ppl_figure(curves, out / "ppl_vs_length.png"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR/plots)")
    p.add_argument("--labels", help="comma-separated legend names, one per RUN_DIR (default: directory names)")
    p.add_argument("--val-length", type=int, help="length whose validation loss is drawn")
    p.add_argument("--eval-json", nargs="*", default=[], help="evidence.evaluate reports for the perplexity figure")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = plot_runs(args.run_dirs, args.out or str(Path(args.run_dirs[0]) / "plots"),
                            args.labels.split(",") if args.labels else None, args.val_length, args.eval_json)
    except UserError as e:
        log.error("%s", e)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
