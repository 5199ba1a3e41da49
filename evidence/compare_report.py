"""The report of evidence.compare, from runs already made: per run its clocks, losses and time to the same seed's
fixed-long target (evidence.speedup); per plan the median and min-max over seeds; the conclusions that hold (or not)
under both clocks and in every seed; report.md and the clock figure. No subprocess, no training: tests build its
inputs by hand.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from evidence import speedup
from evidence.runs import EvidenceError, Run

if TYPE_CHECKING:
    from evidence.compare import Setup

CLOCKS = {"wall-clock": "train_s", "calibrated time": "calibrated_s"}


def summarise(s: Setup, runs: dict[tuple[str, int], Run], times: dict[int, float]) -> dict:
    """Per run (plan, seed): its stages, clocks, losses, time to the same seed's fixed-long target and its time
    against that fixed-long run; per plan the median and min-max over seeds; and the conclusions that hold (or not)
    under both clocks and across seeds."""
    curves = {key: speedup.validation_curve(run, s.long, times) for key, run in runs.items()}
    for seed in s.seed_list:
        if not curves[("fixed-long", seed)]:
            raise EvidenceError(f"{runs[('fixed-long', seed)].path}: no validation loss at L={s.long} in its "
                                f"metrics; raise --valid-fraction or lower --eval-tokens so that the held-out "
                                f"documents hold a window of {s.long} tokens")
    rows = {}
    for (plan, seed), run in runs.items():
        rows[s.run_name(plan, seed)] = run_row(s, plan, seed, run, curves[(plan, seed)],
                                               curves[("fixed-long", seed)][-1]["loss"], times)
    for row in rows.values():
        row["vs_fixed_long"] = against(row, rows[s.run_name("fixed-long", row["seed"])])
    by_plan = {plan: aggregate([r for r in rows.values() if r["plan"] == plan]) for plan in s.plans}
    return {"budget_seconds": s.budget_seconds, "budget_tokens": s.budget_tokens,
            "budget_calibrated_seconds": s.budget_calibrated, "preset": s.preset, "ranks": s.ranks,
            "tokens_per_step": s.tokens_per_step, "lengths": s.lengths, "shares": s.shares, "seeds": s.seed_list,
            "long": s.long, "target_val_loss": rows[s.run_name("fixed-long", s.seed_list[0])]["target_val_loss"],
            "runs": rows, "by_plan": by_plan, "conclusions": conclusions(s, rows)}


def run_row(s: Setup, plan: str, seed: int, run: Run, curve: list[dict], target: float,
            times: dict[int, float]) -> dict:
    last = run.final
    tail = [r["loss"] for r in run.steps[-5:]]
    stopped = "clock" if any("max_time_s" in line and "reached" in line
                             for line in (run.path / "train.log").read_text().splitlines()) else "plan end"
    return {
        "plan": plan, "seed": seed, "target_val_loss": target,
        "stages": [(st["seq_len"], st["step"], st["elapsed_s"]) for st in run.stage_starts()],
        "steps": last["step"], "tokens_seen": last["tokens_seen"], "elapsed_s": last["elapsed_s"],
        "train_s": speedup.training_clock(run)[last["step"]],
        "calibrated_s": speedup.calibrated_clock(run.steps, times)[last["step"]],
        "last_step_s": last["tokens_per_step"] / last["tokens_per_s"], "stopped_by": stopped,
        "final_train_loss": last["loss"], "final_train_loss_mean5": sum(tail) / len(tail),
        "final_train_seq_len": last["seq_len"], "val_loss_long": curve[-1]["loss"] if curve else None,
        "to_target_train_s": speedup.time_to_loss(curve, target, "train_s"),
        "to_target_calibrated_s": speedup.time_to_loss(curve, target, "calibrated_s"),
        "to_target_tokens": speedup.time_to_loss(curve, target, "tokens_seen"), "curve": curve}


def against(row: dict, ref: dict) -> dict:
    """A run's time against the same seed's fixed-long run, per clock: for the same tokens (its time per token over
    fixed-long's) and to fixed-long's final validation loss (None when it never got there)."""
    out = {}
    for clock, key in CLOCKS.items():
        short = "train" if key == "train_s" else "calibrated"
        out[f"same_tokens_{short}"] = speedup.ratio(row[key] / row["tokens_seen"], ref[key] / ref["tokens_seen"])
        out[f"to_target_{short}"] = speedup.ratio(row[f"to_target_{key}"], ref[f"to_target_{key}"])
    return out


def spread(values: list) -> dict:
    """median, mean, min, max of the values that exist, and how many do (a run that never reached a target has
    None)."""
    got = [v for v in values if v is not None]
    return {"median": statistics.median(got) if got else None, "mean": sum(got) / len(got) if got else None,
            "min": min(got, default=None), "max": max(got, default=None), "n": len(got), "of": len(values)}


RATIOS = ("same_tokens_train", "same_tokens_calibrated", "to_target_train", "to_target_calibrated")


def aggregate(rows: list[dict]) -> dict:
    keys = ("val_loss_long", "elapsed_s", "train_s", "calibrated_s", "to_target_train_s", "to_target_calibrated_s",
            "tokens_seen")
    out = {k: spread([r[k] for r in rows]) for k in keys}
    out.update({k: spread([r["vs_fixed_long"][k] for r in rows]) for k in RATIOS})
    return out


def conclusions(s: Setup, rows: dict) -> list[dict]:
    """For each plan against fixed-long, per clock: in how many seeds its validation loss is lower at the time the
    shorter of the two runs ended (equal time, read off both curves), and in how many it reaches fixed-long's final
    loss sooner. ``holds``: in every seed and under both clocks."""
    out = []
    for plan in [p for p in s.plans if p != "fixed-long"]:
        for claim in ("lower val loss at equal time", "reaches fixed-long's final val loss sooner"):
            per_clock = {}
            for clock, key in CLOCKS.items():
                wins = []
                for seed in s.seed_list:
                    mine, ref = rows[s.run_name(plan, seed)], rows[s.run_name("fixed-long", seed)]
                    if claim.startswith("lower"):
                        x = min(mine["curve"][-1][key], ref["curve"][-1][key]) if mine["curve"] else None
                        a = speedup.loss_at(mine["curve"], x, key) if x is not None else None
                        b = speedup.loss_at(ref["curve"], x, key) if x is not None else None
                        wins.append(a is not None and b is not None and a < b)
                    else:
                        to = f"to_target_{key}"
                        wins.append(mine[to] is not None and ref[to] is not None and mine[to] < ref[to])
                per_clock[clock] = sum(wins)
            n = len(s.seed_list)
            holds = all(v == n for v in per_clock.values())
            fails = all(v == 0 for v in per_clock.values())
            out.append({"plan": plan, "claim": claim, "seeds": n, "wins": per_clock,
                        "verdict": "holds" if holds else "does not hold" if fails else "mixed"})
    return out


def fmt(x, spec=".3f", none="not reached"):
    return none if x is None else format(x, spec)


def _median_range(x: dict, spec: str = ".4f") -> str:
    if x["median"] is None:
        return f"not reached (0/{x['of']})"
    reached = f", {x['n']}/{x['of']} reached" if x["n"] < x["of"] else ""
    return f"{x['median']:{spec}} ({x['min']:{spec}}-{x['max']:{spec}}{reached})"


def budget_line(summary: dict) -> str:
    tps = summary["tokens_per_step"]
    if summary["budget_seconds"]:
        return f"equal wall-clock: {summary['budget_seconds']:g} s of training per run"
    if summary["budget_calibrated_seconds"]:
        return f"equal calibrated time: {summary['budget_calibrated_seconds']:g} calibrated s per run"
    return (f"equal tokens: {summary['budget_tokens']:,} per run, in whole steps of {tps:,}: "
            f"{summary['budget_tokens'] // tps * tps:,}")


def speed_table(summary: dict) -> list[str]:
    """The claim in one table: predicted before the runs, realized by them, each against fixed-long."""
    L, n = summary["long"], len(summary["seeds"])
    lines = [f"## Time against fixed-long (L={L}): predicted before training, realized by it", "",
             f"Predicted: the calibration's median step time per length, weighted by the plan's token shares "
             f"(range: the same from each calibration round alone). Realized, median (min-max) over {n} seed(s), "
             f"each run against the same seed's fixed-long run: the time it took per token (for the same tokens), "
             f"and the time it took to reach fixed-long's final validation loss at L={L}. Wall-clock = the "
             f"training clock (the launcher's time of every step and stage switch; start-up, evaluations and "
             f"checkpoints excluded). Calibrated = every step charged the calibrated time of its length, so its "
             f"same-token ratio restates the prediction; its time to the target is what the runs decide.", "",
             "| plan | token shares (L: share) | predicted, same tokens | realized, same tokens: wall-clock | "
             "same tokens: calibrated | to fixed-long's final val loss: wall-clock | to it: calibrated |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for plan, p in summary["predicted"].items():
        a = summary["by_plan"][plan]
        shares = ", ".join(f"{k}: {v:.2f}" for k, v in p["token_shares"].items())
        lines.append(f"| {plan} | {shares} | {p['ratio']:.3f}x ({p['min']:.3f}-{p['max']:.3f}) | "
                     f"{_median_range(a['same_tokens_train'], '.3f')} | "
                     f"{_median_range(a['same_tokens_calibrated'], '.3f')} | "
                     f"{_median_range(a['to_target_train'], '.3f')} | "
                     f"{_median_range(a['to_target_calibrated'], '.3f')} |")
    return lines + [""]


def markdown(summary: dict, command: str, figures: list[str]) -> str:
    L = summary["long"]
    seeds = summary["seeds"]
    lines = [f"# GrowLength vs fixed-length training ({budget_line(summary)})", "", f"Command: `{command}`", "",
             f"Preset `{summary['preset']}`, {summary['ranks']} rank(s), {summary['tokens_per_step']:,} tokens per "
             f"optimizer step, seed(s) {', '.join(map(str, seeds))}; GrowLength lengths {summary['lengths']} with "
             f"shares {summary['shares']}. Validation loss is at L={L} on the same held-out windows for every run "
             f"of a seed (the launcher's own evaluation, in its training precision). Target = the same seed's "
             f"fixed-long final validation loss.", "", *speed_table(summary),
             "## Runs", "",
             f"| run | stages (L from step (elapsed s)) | steps | tokens seen | wall-clock (s) | calibrated (s) | "
             f"stopped by | final train loss (mean of last 5, at L) | val loss @ L={L} | to target, wall (s) | "
             f"to target, calibrated (s) | tokens to target |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in summary["runs"].items():
        stages = " → ".join(f"{sl} from step {st} ({t:.0f} s)" for sl, st, t in r["stages"])
        lines.append(f"| {name} | {stages} | {r['steps']} | {r['tokens_seen']:,} | {r['train_s']:.1f} | "
                     f"{r['calibrated_s']:.1f} | {r['stopped_by']} | {r['final_train_loss_mean5']:.4f} "
                     f"(L={r['final_train_seq_len']}) | {fmt(r['val_loss_long'], '.4f', 'none')} | "
                     f"{fmt(r['to_target_train_s'], '.1f')} | {fmt(r['to_target_calibrated_s'], '.1f')} | "
                     f"{fmt(r['to_target_tokens'], ',.0f')} |")
    lines += ["", f"Over {len(seeds)} seed(s): median (min-max).", "",
              f"| plan | val loss @ L={L} | wall-clock (s) | calibrated (s) | to target, wall (s) | "
              f"to target, calibrated (s) |", "|---|---:|---:|---:|---:|---:|"]
    for plan, a in summary["by_plan"].items():
        lines.append(f"| {plan} | {_median_range(a['val_loss_long'])} | {_median_range(a['train_s'], '.1f')} | "
                     f"{_median_range(a['calibrated_s'], '.1f')} | {_median_range(a['to_target_train_s'], '.1f')} | "
                     f"{_median_range(a['to_target_calibrated_s'], '.1f')} |")
    lines += ["", "Conclusions against fixed-long (seeds where it holds, per clock; a conclusion holds only if it "
              "does in every seed under both clocks):", ""]
    for c in summary["conclusions"]:
        wins = ", ".join(f"{clock} {k}/{c['seeds']}" for clock, k in c["wins"].items())
        lines.append(f"- {c['plan']} {c['claim']}: **{c['verdict']}** ({wins})")
    if summary.get("step_seconds"):
        lines += ["", "Calibrated seconds per optimizer step (real engine, interleaved calibration runs before the "
                  "runs, medians): " + ", ".join(f"L={k}: {v:.3f}" for k, v in summary["step_seconds"].items()) + "."]
    lines += ["", "Training losses at different lengths are not comparable (a short window gives each token less "
              "context); the validation column is.", ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def speed_figure(summary: dict, out: Path) -> Path:
    """Validation loss at the long length against the training clock (left) and the calibrated clock (right),
    every run of every seed; dotted: each seed's target (fixed-long's final validation loss)."""
    import matplotlib.pyplot as plt
    from evidence.plot import COLORS, save_figure
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    colors = {plan: COLORS[i % len(COLORS)] for i, plan in enumerate(summary["by_plan"])}
    for ax, (clock, key) in zip(axes, CLOCKS.items()):
        for name, r in summary["runs"].items():
            curve = r["curve"]
            ax.plot([p[key] for p in curve], [p["loss"] for p in curve], "o-", markersize=3, linewidth=1.2,
                    color=colors[r["plan"]], label=r["plan"] if r["seed"] == summary["seeds"][0] else None)
            if r["plan"] == "fixed-long":
                ax.axhline(r["target_val_loss"], color=colors["fixed-long"], linestyle=":", linewidth=0.9)
        ax.set_xlabel(f"{clock} (s)")
        ax.set_ylabel(f"validation loss at L={summary['long']} (nats / token)")
        ax.set_title(f"against {clock}; dotted: each seed's fixed-long final loss", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out)
