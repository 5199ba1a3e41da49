"""GrowLength against fixed-length training under one budget, everything else identical (the paper's Table 1 and
Figures 1-2 on this machine): the time ratio predicted before training, and the ratios the runs realized.

    python -m evidence.compare (--budget-tokens N | --budget-calibrated-seconds C | --budget-seconds S) --out DIR
        [--preset tiny] [--lengths 64,128,256] [--shares 0.5,0.3,0.2] [--tokens-per-step 2048] [--seeds 1,2,3]
        [--plans fixed-short,fixed-long,growlength] [--calibration-rounds 3] [--calibration-steps 3]
        [--device auto|cpu|cuda[:N]] [--dtype auto|fp32|bf16] [key=value ...]

Runs the real launcher once per plan and seed, only the stage plan differing (the order turned by one from seed to
seed). Before the runs: calibration runs time every length (launcher.steptime medians), and each plan's time against
fixed-long for the same tokens is predicted from them and the plan's token shares (DIR/prediction.json). After the
runs: each run's training and calibrated clocks, its time per token and its time to reach the same seed's fixed-long
final validation loss, from the launcher's own evaluations (evidence.speedup); DIR/report.md, summary.json and
figures. Budgets and clocks: docs/tools.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.atomic import check_dir_writable
from evidence import speedup
from evidence.compare_report import markdown, speed_figure, summarise
from data_pipeline.errors import UserError
from evidence.launch import ROOT, launch_command
from evidence.runs import EvidenceError, add_device_arguments, compute_device, load_run, parse_lengths, \
    write_json, write_text
from launcher import steptime

log = logging.getLogger("growlength")

PLANS = ("fixed-short", "fixed-long", "growlength")
OVERSIZE = 2  # wall-clock budgets: plans are sized to this many times the predicted steps


@dataclass
class Setup:
    out: Path
    budget_seconds: float | None
    budget_tokens: int | None
    lengths: list[int]
    shares: list[float]
    preset: str = "tiny"
    ranks: int = 1
    tokens_per_step: int = 2048
    seed: int = 1234
    plans: tuple = PLANS
    points: int = 6
    eval_tokens: int = 4096
    valid_fraction: float = 0.05
    data_prefix: str | None = None
    tokenizer: str | None = None
    ds_config: str = "ds_configs/zero2.json"
    extra: list = field(default_factory=list)
    calibration_rounds: int = 3
    calibration_steps: int = 3  # timed steps per length in each calibration round (after one warm-up step)
    budget_calibrated: float | None = None
    seeds: list = field(default_factory=list)  # [] = [seed]
    extrapolation: bool = True  # evaluate the first seed's final models at 2x and 4x the long length (Figure 4)
    device: str = "auto"  # where the final models are evaluated (evidence.runs.compute_device)
    dtype: str = "auto"

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def run_name(self, plan: str, seed: int) -> str:
        return plan if len(self.seed_list) == 1 else f"{plan}-seed{seed}"

    @property
    def short(self) -> int:
        return self.lengths[0]

    @property
    def long(self) -> int:
        return self.lengths[-1]


def check_setup(s: Setup) -> None:
    compute_device(s.device, s.dtype)  # before any run: a device that cannot be used is refused now
    if [s.budget_seconds, s.budget_tokens, s.budget_calibrated].count(None) != 2:
        raise EvidenceError("give exactly one budget: --budget-seconds S (equal wall-clock), "
                            "--budget-calibrated-seconds C (equal calibrated time) or --budget-tokens N")
    for flag, value in (("--ranks", s.ranks), ("--tokens-per-step", s.tokens_per_step),
                        ("--eval-tokens", s.eval_tokens)):
        if value < 1:
            raise EvidenceError(f"{flag} {value}: must be at least 1")
    if s.budget_seconds is not None and s.budget_seconds <= 0:
        raise EvidenceError(f"--budget-seconds {s.budget_seconds}: must be positive")
    if s.budget_calibrated is not None and s.budget_calibrated <= 0:
        raise EvidenceError(f"--budget-calibrated-seconds {s.budget_calibrated}: must be positive")
    if len(set(s.seed_list)) != len(s.seed_list):
        raise EvidenceError(f"--seeds {','.join(map(str, s.seed_list))}: each seed once")
    if s.budget_tokens is not None and s.budget_tokens < s.tokens_per_step:
        raise EvidenceError(f"--budget-tokens {s.budget_tokens}: less than one step of --tokens-per-step "
                            f"{s.tokens_per_step}")
    if len(s.lengths) < 2:
        raise EvidenceError(f"--lengths {s.lengths}: give at least a short and a long length")
    if len(s.shares) != len(s.lengths) or abs(sum(s.shares) - 1) > 1e-6 or min(s.shares) <= 0:
        raise EvidenceError(f"--shares {s.shares}: one positive share per length in --lengths {s.lengths}, "
                            f"summing to 1")
    bad = [L for L in s.lengths if s.tokens_per_step % (L * s.ranks)]
    if bad:
        raise EvidenceError(f"--tokens-per-step {s.tokens_per_step} is not a multiple of seq_len * ranks for "
                            f"lengths {bad}; use a multiple of {s.long * s.ranks}")
    if not 0 < s.valid_fraction < 1:
        raise EvidenceError(f"--valid-fraction {s.valid_fraction}: must be between 0 and 1 (exclusive); every run "
                            f"is validated at the longest length on held-out documents")
    if s.points < 1:
        raise EvidenceError(f"--points {s.points}: must be at least 1 (validation points per run)")
    if s.calibration_rounds < 1:
        raise EvidenceError(f"--calibration-rounds {s.calibration_rounds}: must be at least 1")
    if s.calibration_steps < 1:
        raise EvidenceError(f"--calibration-steps {s.calibration_steps}: must be at least 1")
    unknown = set(s.plans) - set(PLANS)
    if unknown or "fixed-long" not in s.plans:
        raise EvidenceError(f"--plans {list(s.plans)}: choose from {', '.join(PLANS)}; fixed-long is the reference "
                            f"and is always needed")


# ---- plans ------------------------------------------------------------------------------------------------------
def calibration_stages(s: Setup, steps_per_round: int) -> list[dict]:
    """One calibration round: every length in turn (shortest first, as a plan must grow), each stage one warm-up
    step after its switch and then ``steps_per_round`` timed steps."""
    return [{"seq_len": L, "tokens": (1 + steps_per_round) * s.tokens_per_step} for L in s.lengths]


def calibration_times(s: Setup, rounds: list[list[dict]]) -> steptime.StepTimes:
    """launcher.steptime's summary of the calibration runs' step records (one list per run, i.e. per round); each
    stage's first step, the warm-up after its switch, is dropped."""
    timed = []
    for records in rounds:
        by_stage: dict[int, list[float]] = {}
        for r in records:
            by_stage.setdefault(r["stage"], []).append(r["tokens_per_step"] / r["tokens_per_s"])
        timed.append({L: by_stage[k][1:] for k, L in enumerate(s.lengths)})
    return steptime.summarize(timed)


def calibrate(s: Setup, ds_config: str) -> steptime.StepTimes:
    """Seconds per optimizer step at each length, measured on the real launcher and engine: ``s.calibration_rounds``
    short calibration runs (OUT/runs/calibration-R), each a round over every length (:func:`calibration_stages`) in
    a fresh launcher process, so every round starts from the same process state; launcher.steptime's summary
    (medians per length), with a warning when the machine was noisy. No validation: only the steps are timed."""
    rounds, steps_per_round = [], s.calibration_steps
    for r in range(s.calibration_rounds):
        run_dir = launch(s, f"calibration-{r}", calibration_stages(s, steps_per_round), ds_config, warmup=1,
                         extra=["checkpointing.at_stage_end=false", "checkpointing.interval_steps=0",
                                "logging.eval_lengths=[]", "growlength.max_time_s=null",
                                "data.valid_fraction=0"])
        rounds.append(load_run(run_dir).steps)
    times = calibration_times(s, rounds)
    log.info("step times of the real engine (%d rounds of %d timed steps per length):\n%s", s.calibration_rounds,
             steps_per_round, steptime.table(times))
    warning = times.warning("the planned wall-clock shares may be off: rerun with more --calibration-rounds or on a "
                            "quiet machine")
    if warning:
        log.warning("calibration: %s", warning)
    return times


def predictions(plans: dict[str, list[dict]], times: steptime.StepTimes, reference: str = "fixed-long") -> dict:
    """Before training: each plan's predicted time for its tokens over ``reference``'s for the same tokens, from the
    calibration's medians (``ratio``) and from each calibration round's own medians (``min``-``max``), with the
    plan's token shares."""
    ref_len = plans[reference][0]["seq_len"]
    rounds = [{L: t.round_medians()[r] for L, t in times.lengths.items()}
              for r in range(len(next(iter(times.lengths.values())).rounds))]
    out = {}
    for name, stages in plans.items():
        per_round = [speedup.predicted_ratio(stages, m, ref_len) for m in rounds]
        out[name] = {"ratio": speedup.predicted_ratio(stages, {L: times.median(L) for L in times.lengths}, ref_len),
                     "min": min(per_round), "max": max(per_round),
                     "token_shares": {str(L): v for L, v in speedup.token_shares(stages).items()}}
    return out


def stage_plans(s: Setup, times: dict[int, float] | None) -> dict[str, list[dict]]:
    """``{plan name: growlength.stages}``, every stage with an absolute token budget."""
    tps = s.tokens_per_step
    if s.budget_calibrated is not None:  # each plan's steps cost C at the calibrated step times
        C = s.budget_calibrated
        grow = [max(1, round(share * C / times[L])) for share, L in zip(s.shares, s.lengths)]
        fixed = {"fixed-short": max(1, round(C / times[s.short])), "fixed-long": max(1, round(C / times[s.long]))}
    elif s.budget_tokens is not None:
        steps = s.budget_tokens // tps
        grow, given = [], 0
        for i, share in enumerate(s.shares):
            n = steps - given if i == len(s.shares) - 1 else max(1, round(share * steps))
            grow.append(n)
            given += n
        fixed = {"fixed-short": steps, "fixed-long": steps}
    else:
        # stages before the last take their share of S; the last stage and the fixed runs get OVERSIZE x their
        # predicted steps so that the clock, not the plan, ends every run (the probe is only an estimate, and with
        # a constant LR after warmup the unused part of a plan changes nothing)
        grow = [max(1, round(share * s.budget_seconds / times[L])) for share, L in zip(s.shares[:-1], s.lengths)]
        grow.append(max(1, round(OVERSIZE * s.shares[-1] * s.budget_seconds / times[s.long])))
        fixed = {"fixed-short": max(2, round(OVERSIZE * s.budget_seconds / times[s.short])),
                 "fixed-long": max(2, round(OVERSIZE * s.budget_seconds / times[s.long]))}
    if min(grow) < 1:
        raise EvidenceError(f"budget too small: GrowLength stages get {grow} steps; raise the budget")
    plans = {"fixed-short": [{"seq_len": s.short, "tokens": fixed["fixed-short"] * tps}],
             "fixed-long": [{"seq_len": s.long, "tokens": fixed["fixed-long"] * tps}],
             "growlength": [{"seq_len": L, "tokens": n * tps} for L, n in zip(s.lengths, grow)]}
    return {name: plans[name] for name in s.plans}


def ds_config_for(s: Setup) -> str:
    """The ds_config every run uses: the given one, or for a wall-clock budget the same with WarmupLR."""
    if s.budget_seconds is None:
        return s.ds_config
    from launcher.ds_config import load_ds_config
    cfg = load_ds_config(str(ROOT / s.ds_config if not Path(s.ds_config).is_absolute() else s.ds_config))
    params = {k: v for k, v in cfg.get("scheduler", {}).get("params", {}).items()
              if k in ("warmup_min_lr", "warmup_max_lr", "warmup_type")}
    cfg["scheduler"] = {"type": "WarmupLR", "params": params}
    return str(write_json(s.out / "ds_config.json", cfg).resolve())


# ---- running ----------------------------------------------------------------------------------------------------
def launch(s: Setup, name: str, stages: list[dict], ds_config: str, warmup: int, extra: list[str] = (),
           seed: int | None = None) -> Path:
    run_dir = (s.out / "runs" / name).resolve()
    steps = sum(st["tokens"] for st in stages) // s.tokens_per_step
    if s.budget_seconds is not None:  # evaluations spread over the predicted steps, not the oversized plan
        steps = steps // OVERSIZE
    overrides = [f"run_dir={run_dir}", f"seed={s.seed if seed is None else seed}", f"model.preset={s.preset}",
                 f"growlength.tokens_per_step={s.tokens_per_step}", "growlength.total_tokens=null",
                 f"growlength.stages={json.dumps(stages)}", f"optimisation.warmup_steps={warmup}",
                 f"data.valid_fraction={s.valid_fraction}", f"data.cache_dir={(s.out / 'index-cache').resolve()}",
                 "checkpointing.interval_steps=0", "checkpointing.at_stage_end=false",
                 f"logging.eval_tokens={s.eval_tokens}", f"logging.eval_lengths=[{s.long}]",
                 f"logging.eval_interval={max(1, steps // s.points)}", f"logging.log_interval={max(1, steps // 10)}",
                 "logging.tensorboard=false", "checkpointing.resume=none"]
    if s.budget_seconds is not None:
        overrides.append(f"growlength.max_time_s={s.budget_seconds}")
    if s.data_prefix:
        overrides += [f"data.prefix={s.data_prefix}", f"data.tokenizer={s.tokenizer}"]
    cmd, env = launch_command(s.ranks)
    env.pop("GROWLENGTH_FAULT", None)
    cmd += ["--ds_config", ds_config, *overrides, *s.extra, *extra]  # later key=value wins
    log.info("%s: %s", name, " ".join(cmd))
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{name}.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}:\n{tail}")
    log.info("%s done in %.0fs (process wall-clock)", name, time.perf_counter() - t0)
    return run_dir


# ---- the comparison ------------------------------------------------------------------------------------------
def run_order(s: Setup, index: int) -> list[str]:
    """The plans of the ``index``-th seed, in the order they run: fixed-long first for the first seed, and the
    order turned by one for each later seed, so that no plan always runs first or last in the sequence."""
    order = ["fixed-long"] + [p for p in s.plans if p != "fixed-long"]
    k = index % len(order)
    return order[k:] + order[:k]


def state_prediction(s: Setup, plans: dict[str, list[dict]], times: steptime.StepTimes) -> dict:
    """The prediction, written (OUT/prediction.json) and logged before any run starts."""
    predicted = predictions(plans, times)
    write_json(s.out / "prediction.json", {"step_seconds": {L: times.median(L) for L in s.lengths},
                                            "calibration": {L: times.row(L) for L in s.lengths},
                                            "plans": plans, "predicted": predicted})
    for name, p in predicted.items():
        log.info("predicted before training: %s takes %.3fx (%.3f-%.3f over calibration rounds) the time of "
                 "fixed-long for the same tokens", name, p["ratio"], p["min"], p["max"])
    return predicted


def compare(s: Setup, command: str = "") -> dict:
    check_setup(s)
    # before the runs: a report that cannot be saved is refused, not lost
    check_dir_writable(s.out, "--out", error=EvidenceError)
    s.out.mkdir(parents=True, exist_ok=True)
    ds_config = ds_config_for(s)
    calibration = calibrate(s, ds_config)  # every budget: the calibrated clock is charged to every run
    times = {L: calibration.median(L) for L in s.lengths}
    plans = stage_plans(s, times)
    predicted = state_prediction(s, plans, calibration)
    if s.budget_tokens is not None:
        warmup = max(1, round(0.05 * s.budget_tokens // s.tokens_per_step))
    else:
        budget = s.budget_seconds if s.budget_seconds is not None else s.budget_calibrated
        warmup = max(1, round(0.05 * budget / max(times.values())))
    run_dirs = {}
    for i, seed in enumerate(s.seed_list):
        for name in run_order(s, i):
            run_dirs[(name, seed)] = launch(s, s.run_name(name, seed), plans[name], ds_config, warmup, seed=seed)
    runs = {key: load_run(d, s.run_name(*key)) for key, d in run_dirs.items()}
    summary = summarise(s, runs, times)
    summary.update(step_seconds=times, plans=plans, predicted=predicted)

    first = s.seed_list[0]  # the extrapolation curves and the training-loss figures: the first seed's runs
    ordered = [n for n in PLANS if n in s.plans]
    reports = []
    if s.extrapolation:
        from evidence.evaluate import evaluate
        eval_lengths = sorted(set(s.lengths) | {2 * s.long, 4 * s.long})
        for name in ordered:  # each final model's extrapolation curve (Figure 4)
            rep = evaluate(str(run_dirs[(name, first)]), lengths=eval_lengths, tokens=s.eval_tokens, split="run",
                           dtype=s.dtype, device=s.device)
            reports.append(str(write_json(s.out / f"eval_{name}.json", rep)))
    from evidence.plot import plot_runs
    figures = [speed_figure(summary, s.out / "val_loss_vs_clock.png"),
               *plot_runs([str(run_dirs[(n, first)]) for n in ordered], str(s.out), ordered, s.long,
                          eval_reports=reports, run_ppl=False)]
    write_json(s.out / "summary.json", summary)
    write_text(s.out / "report.md", markdown(summary, command, [str(f) for f in figures]))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-seconds", type=float, help="equal training wall-clock per run")
    budget.add_argument("--budget-tokens", type=int, help="equal tokens per run")
    budget.add_argument("--budget-calibrated-seconds", type=float,
                        help="equal calibrated time per run (steps charged at the calibration's step times)")
    p.add_argument("--out", required=True, help="report directory (runs under OUT/runs)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--lengths", default="64,128,256", help="GrowLength stages; first = fixed-short, last = fixed-long")
    p.add_argument("--shares", default="0.5,0.3,0.2", help="GrowLength share of the budget per length")
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", help="comma-separated seeds: every plan once per seed (default: --seed alone)")
    p.add_argument("--plans", default=",".join(PLANS), help="subset of the plans to run (fixed-long required)")
    p.add_argument("--points", type=int, default=6, help="checkpoints per run for the validation curve")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--data-prefix", help="training corpus PREFIX (default: the built-in corpus)")
    p.add_argument("--tokenizer", help="sentencepiece model of --data-prefix")
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("--calibration-rounds", type=int, default=3,
                   help="calibration runs before the runs, each timing every length once in turn")
    p.add_argument("--calibration-steps", type=int, default=3,
                   help="timed steps per length in each calibration run (after one warm-up step)")
    p.add_argument("--no-extrapolation", dest="extrapolation", action="store_false",
                   help="skip evaluating the final models at 2x and 4x the longest length (Figure 4)")
    add_device_arguments(p, "evaluation")
    p.add_argument("overrides", nargs="*", help="extra key=value passed to every run (e.g. model.num_layers=4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        shares = [float(x) for x in args.shares.split(",")]
    except ValueError:
        log.error("--shares %r: comma-separated numbers, e.g. 0.5,0.3,0.2", args.shares)
        return 2
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        log.error("--seeds %r: comma-separated integers, e.g. 1,2,3", args.seeds)
        return 2
    s = Setup(out=Path(args.out), budget_seconds=args.budget_seconds, budget_tokens=args.budget_tokens,
              lengths=None, shares=shares, preset=args.preset, ranks=args.ranks,
              tokens_per_step=args.tokens_per_step, seed=args.seed, plans=tuple(args.plans.split(",")),
              points=args.points, eval_tokens=args.eval_tokens, valid_fraction=args.valid_fraction,
              data_prefix=args.data_prefix, tokenizer=args.tokenizer, ds_config=args.ds_config,
              extra=args.overrides, calibration_rounds=args.calibration_rounds,
              calibration_steps=args.calibration_steps, extrapolation=args.extrapolation,
              budget_calibrated=args.budget_calibrated_seconds, seeds=seeds, device=args.device, dtype=args.dtype)
    try:
        s.lengths = parse_lengths(args.lengths)
        if (s.data_prefix is None) != (s.tokenizer is None):
            raise EvidenceError("--data-prefix and --tokenizer go together")
        summary = compare(s, "python -m evidence.compare " + " ".join(argv if argv is not None else sys.argv[1:]))
    except UserError as e:
        log.error("%s", e)
        return 2
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    print((s.out / "report.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
