"""The evidence tools (evaluate, plot, bench_lengths, compare) on a tiny 1-rank run made here with the real launcher.

One module-scoped training (2 stages, 32 -> 64, 12 steps, checkpoints every 4) is shared by every test.
"""
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from launcher.plan import PlanError

from evidence import bench_lengths, compare, evaluate, plot
from launcher.metrics import read_metrics
from evidence.runs import EvidenceError, load_run, parse_lengths
import stepclock
from launching import pretrain_args

ROOT = Path(__file__).resolve().parents[2]
PLAN = ["growlength.tokens_per_step=512",
        "growlength.stages=[{seq_len: 32, tokens: 3072}, {seq_len: 64, tokens: 3072}]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenized, sp_model, launch):
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    proc = launch(pretrain_args(run_dir, tokenized, sp_model, "checkpointing.interval_steps=4",
                                "logging.log_interval=4", "logging.eval_tokens=1024", "logging.eval_lengths=[128]",
                                *PLAN))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def final_eval(run_dir) -> dict:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"][-1]


# ---- evaluate ---------------------------------------------------------------------------------------------------
def test_evaluate_agrees_with_in_loop_validation(run_dir):
    """Same windows (eval_tokens // L, run split), same bf16 rounding of the same master weights as the bf16 engine:
    only batch composition and summation order differ, so 1e-3 is generous. fp32 differs by the bf16 rounding of
    weights and activations (4e-4 on these runs); 0.02 nats bounds it with room and would still catch a wrong split,
    window or length (those move the loss by > 0.05 here)."""
    in_loop = final_eval(run_dir)
    assert in_loop["step"] == 12 and {"val_loss_64", "val_loss_128"} <= set(in_loop)
    bf16 = evaluate.evaluate(str(run_dir), lengths=[64, 128], dtype="bf16")
    assert bf16["split"] == "run" and bf16["step"] == 12 and bf16["trained_seq_len"] == 64
    for r in bf16["results"]:
        windows = min(1024 // r["seq_len"], (bf16["validation_tokens"] - 1) // r["seq_len"])  # launcher's rule
        assert r["windows"] == windows > 0 and r["tokens"] == windows * r["seq_len"]
        assert r["loss"] == pytest.approx(in_loop[f"val_loss_{r['seq_len']}"], abs=1e-3)
    fp32 = evaluate.evaluate(str(run_dir / "checkpoints" / "step_00000012"), lengths=[64, 128])
    for r in fp32["results"]:
        assert r["loss"] == pytest.approx(in_loop[f"val_loss_{r['seq_len']}"], abs=0.02)
    other = evaluate.evaluate(str(run_dir), lengths=[32], tokens=64, split="run")
    assert other["results"][0]["windows"] == 2


def test_evaluate_cli_table_json_rope_and_too_long(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--checkpoint", str(run_dir), "--lengths", "64,128,1000000", "--rope-scaling", "linear",
                        "--rope-factor", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["rope_scaling"] == "linear" and report["rope_factor"] == 2.0
    by_len = {r["seq_len"]: r for r in report["results"]}
    assert "skipped" in by_len[1000000] and by_len[128]["ppl"] > 1
    table = capsys.readouterr().out
    assert "seq_len" in table and "  128*" in table and "extrapolation" in table


def test_evaluate_bad_inputs(run_dir, tmp_path, caplog):
    with pytest.raises(EvidenceError, match="0, -5 are not a positive integer"):
        parse_lengths("128,0,-5")
    with pytest.raises(EvidenceError, match="is not a positive integer"):
        parse_lengths("128,abc")
    assert evaluate.main(["--checkpoint", str(run_dir), "--lengths", "0,128"]) == 2
    assert "not a positive integer" in caplog.text
    with pytest.raises(EvidenceError, match="no such file or directory"):
        evaluate.evaluate(str(tmp_path / "missing"), lengths=[64])
    with pytest.raises(EvidenceError, match="not a checkpoint"):
        evaluate.evaluate(str(tmp_path), lengths=[64])
    with pytest.raises(EvidenceError, match="--data-prefix .*nope.bin not found"):
        evaluate.evaluate(str(run_dir), data_prefix=str(tmp_path / "nope"), lengths=[64])
    # the CLI, as a user runs it: exit code 2 and the reason on stderr
    proc = subprocess.run([sys.executable, "-m", "evidence.evaluate", "--checkpoint", str(tmp_path / "missing")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


# ---- plot -------------------------------------------------------------------------------------------------------
def assert_png(path: Path, min_bytes: int = 15_000):
    assert path.is_file() and path.stat().st_size > min_bytes, path
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_plot_renders_runs_and_reports(run_dir, tmp_path):
    report = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(run_dir), "--lengths", "32,64,128", "--out", str(report)]) == 0
    out = tmp_path / "plots"
    assert plot.main([str(run_dir), str(run_dir), "--labels", "a,b", "--out", str(out),
                      "--eval-json", str(report)]) == 0
    for name in ("loss_vs_tokens.png", "loss_vs_time.png", "ppl_vs_length.png"):
        assert_png(out / name)
    run = load_run(run_dir)
    assert [s["seq_len"] for s in run.stage_starts()] == [32, 64]
    assert plot.common_val_length([run]) == 128
    curves = plot.ppl_curves([run], [json.loads(report.read_text())])
    assert [c[3] for c in curves] == [32, 64, 64]  # one curve per stage end, then the report's


def test_plot_bad_inputs(tmp_path, caplog):
    with pytest.raises(EvidenceError, match="no metrics.jsonl in this directory"):
        load_run(tmp_path)
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"kind": "stage", "step": 0, "stage": 0, "seq_len": 32}\n')
    with pytest.raises(EvidenceError, match="no step records"):
        load_run(tmp_path)


# ---- bench_lengths ----------------------------------------------------------------------------------------------
def test_bench_lengths_table_json_and_stage_micro_batches(spawns, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_lengths.main(["--preset", "tiny", "--lengths", "32,64", "--tokens-per-batch", "256", "--vocab-size",
                             "1000", "--dtype", "fp32", "--steps", "1", "--memory-cap-gb", "0.4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["lengths"]
    assert [r["seq_len"] for r in rows] == [32, 64] and [r["micro_batch"] for r in rows] == [8, 4]
    assert rows[-1]["step_time_ratio"] == 1.0 and rows[-1]["memory_ratio"] == 1.0
    assert report["repeats"] == 3 and report["steps"] == 1
    cap = 0.4 * (1 << 30)
    for r in rows:
        assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"] and r["timed_steps"] == 3  # 3 rounds x 1
        assert r["step_s_spread"] == pytest.approx(r["step_s_max"] / r["step_s_min"])
        assert r["noisy"] == (r["step_s_spread"] > 1.2) == (r["seq_len"] in report["noisy_lengths"]) == ("hint" in r)
        assert r["step_time_ratio"] == pytest.approx(r["step_s"] / rows[-1]["step_s"])
        assert r["step_time_ratio_min"] <= r["step_time_ratio_max"]
        assert 0 < r["peak_bytes"] < cap
        assert r["max_tokens_per_batch"] == r["max_micro_batch"] * r["seq_len"] > r["tokens_per_batch"]
        assert r["probe_checks"][-1]["peak_bytes"] <= cap  # the answer was measured, not only predicted
    # the fixed part of memory (weights, optimizer) is shared: only the first length needs a second fit point
    assert [c["micro_batch"] for c in rows[0]["probe_checks"]][0] == rows[0]["micro_batch"] // 2
    assert len(rows[1]["probe_checks"]) < len(rows[0]["probe_checks"])
    assert "max tokens" in capsys.readouterr().out
    limit = bench_lengths.max_tokens_per_micro_batch(report, 48)  # between probed lengths: the longer one's value
    assert limit % 48 == 0 and limit <= rows[1]["max_tokens_per_batch"]
    plan = bench_lengths.stage_micro_batches(report, [32, 64], tokens_per_step=1 << 20, world_size=2)
    for L, (mb, accum) in plan.items():
        assert mb * L * accum * 2 == 1 << 20 and mb * L <= bench_lengths.max_tokens_per_micro_batch(report, L)
    with pytest.raises(PlanError, match="longer than every length in the probe"):
        bench_lengths.max_tokens_per_micro_batch(report, 128)


def test_bench_lengths_table_and_json_flag_a_noisy_length():
    """One 5x slow step at L=32 on a fake clock: the row keeps its median and ratio, and is flagged with the hint."""
    from launcher import steptime
    cost = {32: 1.0, 64: 2.0}
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    calls = []

    def step(L):
        def run():
            calls.append(L)
            clock.now += 5.0 if len(calls) == 5 else cost[L]  # warm-up 32, 64; round 0: 32, 64; round 1: 32 slow
        return run

    times = steptime.measure({L: step(L) for L in cost}, rounds=3, clock=clock)
    rows = bench_lengths.time_rows(times, 256)
    assert rows[32]["step_s"] == 1.0 and rows[32]["step_time_ratio"] == 0.5 and rows[32]["step_s_max"] == 5.0
    assert rows[32]["noisy"] and "--repeats" in rows[32]["hint"] and not rows[64]["noisy"] and "hint" not in rows[64]
    report = {"preset": "tiny", "dtype": "fp32", "device": "cpu", "memory_cap_gb": None, "tokens_per_batch": 256,
              "repeats": 3, "steps": 1, "noisy_lengths": times.noisy(),
              "lengths": [dict(r, peak_bytes=1 << 20, memory_ratio=1.0) for r in rows.values()]}
    lines = bench_lengths.table(report).splitlines()
    assert lines[3].split()[:6] == ["32", "8", "1.0000", "5.00!", "0.50", "0.50-2.50"]
    assert lines[4].split()[3] == "1.00" and "noisy; rerun with more --repeats" in lines[-1]


def test_bench_lengths_bad_inputs(spawns, caplog):
    with pytest.raises(EvidenceError, match="not a multiple of length"):
        bench_lengths.bench("tiny", [48, 64], tokens_per_batch=256)
    with pytest.raises(EvidenceError, match="choose one of"):
        bench_lengths.bench("huge", [64], tokens_per_batch=256)
    with pytest.raises(EvidenceError, match="--steps 2 --repeats 0: both must be at least 1"):
        bench_lengths.bench("tiny", [64], tokens_per_batch=256, repeats=0)
    assert bench_lengths.main(["--lengths", "64,-1"]) == 2
    # 2**37 tokens at L=32 is a (2**32, 33) int64 batch, 1.1 TB: the real CPU allocator refuses the first allocation
    assert bench_lengths.main(["--lengths", "32", "--tokens-per-batch", str(1 << 37), "--vocab-size", "1000"]) == 2
    assert re.search(r"a batch of --tokens-per-batch 137438953472 does not fit in cpu memory at seq_len 32: .*can't "
                     r"allocate memory.*; lower --tokens-per-batch", caplog.text)


# ---- compare ----------------------------------------------------------------------------------------------------
def run_compare(tmp_path, tokenized, sp_model, *budget, more=()):
    out = tmp_path / "cmp"
    rc = compare.main([*budget, "--out", str(out), "--lengths", "32,64", "--shares", "0.5,0.5",
                       "--tokens-per-step", "512", "--plans", "fixed-long,growlength", "--points", "2",
                       "--eval-tokens", "1024", "--valid-fraction", "0.1", "--data-prefix", tokenized,
                       "--tokenizer", sp_model, "--calibration-rounds", "1", *more])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


def test_compare_equal_tokens(spawns, tmp_path, tokenized, sp_model):
    out, summary = run_compare(tmp_path, tokenized, sp_model, "--budget-tokens", "4000")
    for name, r in summary["runs"].items():
        assert r["tokens_seen"] == 3584 and r["stopped_by"] == "plan end"  # 4000 rounded down to 7 steps of 512
    fixed, grow = summary["runs"]["fixed-long"], summary["runs"]["growlength"]
    assert fixed["to_target_train_s"] is not None  # it reaches its own final loss
    assert fixed["vs_fixed_long"]["same_tokens_train"] == 1.0
    assert [st[:2] for st in grow["stages"]] == [[32, 0], [64, 4]]
    # the launcher's own evaluations at L=64: every 7 // 2 = 3 steps and at each stage end
    assert [p["step"] for p in fixed["curve"]] == [3, 6, 7] and [p["step"] for p in grow["curve"]] == [3, 4, 6, 7]
    assert grow["curve"][-1]["loss"] == final_eval(out / "runs" / "growlength")["val_loss_64"]
    # the prediction was written before the first run started, from the calibration's medians
    prediction = json.loads((out / "prediction.json").read_text())
    assert (out / "prediction.json").stat().st_mtime < (out / "runs" / "fixed-long" / "metrics.jsonl").stat().st_mtime
    t = {int(k): v for k, v in prediction["step_seconds"].items()}
    assert prediction["predicted"]["growlength"]["ratio"] == pytest.approx((4 * t[32] + 3 * t[64]) / 7 / t[64])
    assert summary["predicted"] == prediction["predicted"]
    report = (out / "report.md").read_text()
    assert "equal tokens: 4,000 per run" in report and "| growlength |" in report
    assert f"| growlength | 32: 0.57, 64: 0.43 | {prediction['predicted']['growlength']['ratio']:.3f}x" in report
    for name in ("val_loss_vs_clock.png", "loss_vs_tokens.png", "loss_vs_time.png", "ppl_vs_length.png"):
        assert_png(out / name)


def test_compare_equal_wall_clock_stops_every_run_at_the_budget(spawns, tmp_path, tokenized, sp_model, monkeypatch):
    """--budget-seconds with every launcher run on a step clock (tests/stepclock.py: a step at L=32 costs 0.5 s, at
    L=64 1 s, whatever the machine does meanwhile): the calibration measures exactly those costs, the plans are sized
    from them (GrowLength's first stage its share, the rest oversized), and every run stops at the first step whose
    clock check is past the budget, by the clock, not by its plan."""
    seconds = {32: 0.5, 64: 1.0}
    launch_command = compare.launch_command

    def on_the_step_clock(ranks, **kw):
        cmd, env = launch_command(ranks, script=str(stepclock.SCRIPT), **kw)
        return cmd, {**env, **stepclock.env(seconds)}

    monkeypatch.setattr(compare, "launch_command", on_the_step_clock)
    budget = 5.8
    out, summary = run_compare(tmp_path, tokenized, sp_model, "--budget-seconds", str(budget))
    assert summary["step_seconds"] == {"32": 0.5, "64": 1.0}
    # GrowLength: 0.5 x 5.8 s at L=32 = 6 steps, then 2 x 0.5 x 5.8 s at L=64 = 6 steps; fixed-long 2 x 5.8 s = 12
    assert summary["plans"]["growlength"] == [{"seq_len": 32, "tokens": 6 * 512}, {"seq_len": 64, "tokens": 6 * 512}]
    assert summary["plans"]["fixed-long"] == [{"seq_len": 64, "tokens": 12 * 512}]
    runs = summary["runs"]
    # the clock after each step: growlength 0.5, ..., 3.0 (L=32), 4, 5, 6 (L=64); fixed-long 1, 2, ..., 6
    assert (runs["growlength"]["steps"], runs["fixed-long"]["steps"]) == (9, 6)
    assert runs["growlength"]["stages"] == [[32, 0, 0.0], [64, 6, 3.0]]
    for name, r in runs.items():
        steps = load_run(out / "runs" / name).steps
        assert r["stopped_by"] == "clock" and r["elapsed_s"] == 6.0, name
        assert steps[-2]["elapsed_s"] < budget <= steps[-1]["elapsed_s"], name  # no step started past the budget
    assert json.loads((out / "ds_config.json").read_text())["scheduler"]["type"] == "WarmupLR"
    calibration = load_run(out / "runs" / "calibration-0").steps  # 1 warm-up + 3 timed steps per length
    assert [(x["seq_len"], x["tokens_per_step"] / x["tokens_per_s"]) for x in calibration] == \
        [(32, 0.5)] * 4 + [(64, 1.0)] * 4


def test_compare_calibrated_budget_over_seeds(spawns, tmp_path, tokenized, sp_model):
    """Equal calibrated time over 2 seeds: every run is charged its steps at the calibration's medians, the plans
    cost the budget within half a step per stage, and the per-plan spread and the conclusions come from the runs."""
    budget = 1.5
    out, summary = run_compare(tmp_path, tokenized, sp_model, "--budget-calibrated-seconds", str(budget),
                               more=["--seeds", "1,2"])
    times = {int(k): v for k, v in summary["step_seconds"].items()}
    calib = load_run(out / "runs" / "calibration-0").steps
    assert times[64] == pytest.approx(statistics.median(
        x["tokens_per_step"] / x["tokens_per_s"] for x in calib if x["seq_len"] == 64 and x["step"] != 5))
    assert sorted(summary["runs"]) == ["fixed-long-seed1", "fixed-long-seed2", "growlength-seed1", "growlength-seed2"]
    first_losses = set()
    for name, r in summary["runs"].items():
        steps = load_run(out / "runs" / name).steps
        charged = sum(times[x["seq_len"]] for x in steps)  # the calibrated clock, recomputed from the records
        assert r["calibrated_s"] == pytest.approx(charged) and r["stopped_by"] == "plan end", name
        stages = 1 if r["plan"] == "fixed-long" else 2
        assert abs(charged - budget) <= stages * max(times.values()) / 2 + 1e-9, (name, charged)
        assert r["curve"][-1]["calibrated_s"] == pytest.approx(charged)
        first_losses.add(round(steps[0]["loss"], 6))
    assert len(first_losses) == 4  # two seeds: other inits (and two plans: other lengths)
    for plan in ("fixed-long", "growlength"):
        vals = [summary["runs"][f"{plan}-seed{k}"]["val_loss_long"] for k in (1, 2)]
        agg = summary["by_plan"][plan]["val_loss_long"]
        assert (agg["mean"], agg["min"], agg["max"]) == pytest.approx((sum(vals) / 2, min(vals), max(vals)))
    [lower, sooner] = summary["conclusions"]
    for c in (lower, sooner):
        assert set(c["wins"]) == {"wall-clock", "calibrated time"} and all(0 <= v <= 2 for v in c["wins"].values())
        assert c["verdict"] == ("holds" if set(c["wins"].values()) == {2} else
                                "does not hold" if set(c["wins"].values()) == {0} else "mixed")
    report = (out / "report.md").read_text()
    assert "equal calibrated time: 1.5 calibrated s per run" in report and "Over 2 seed(s)" in report
    assert f"growlength lower val loss at equal time: **{lower['verdict']}**" in report


def test_compare_calibration_rounds_take_medians_and_flag_noise():
    """Step records of two calibration rounds (as load_run gives them): the warm-up step of each stage is dropped,
    one slow step leaves the median alone and flags its length."""
    s = compare.Setup(out=Path("."), budget_seconds=1.0, budget_tokens=None, lengths=[32, 64], shares=[0.5, 0.5],
                      tokens_per_step=512)
    assert compare.calibration_stages(s, 3) == [{"seq_len": 32, "tokens": 2048}, {"seq_len": 64, "tokens": 2048}]

    def records(seconds):  # seconds per step: 4 at L=32 (stage 0), then 4 at L=64 (stage 1)
        return [{"stage": i // 4, "seq_len": 32 if i < 4 else 64, "tokens_per_step": 512, "tokens_per_s": 512 / t}
                for i, t in enumerate(seconds)]
    times = compare.calibration_times(s, [records([9, 1, 1, 1, 9, 2, 2, 2]), records([9, 1, 3, 1, 9, 2, 2, 2])])
    assert times.median(32) == pytest.approx(1.0) and times.median(64) == pytest.approx(2.0)
    assert times.noisy() == [32] and times.lengths[64].max == pytest.approx(2.0)  # the 9 s warm-ups do not count


def test_compare_bad_inputs(tmp_path, caplog):
    assert compare.main(["--budget-seconds", "-1", "--out", str(tmp_path)]) == 2
    assert "must be positive" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--lengths", "64,0"]) == 2
    assert "not a positive integer" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--shares", "0.5,0.5"]) == 2
    assert "one positive share per length" in caplog.text
    assert compare.main(["--budget-seconds", "5", "--out", str(tmp_path), "--calibration-rounds", "0"]) == 2
    assert "--calibration-rounds 0: must be at least 1" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--calibration-steps", "0"]) == 2
    assert "--calibration-steps 0: must be at least 1" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--valid-fraction", "0"]) == 2
    assert "--valid-fraction 0.0: must be between 0 and 1" in caplog.text
    assert compare.main(["--budget-calibrated-seconds", "0", "--out", str(tmp_path)]) == 2
    assert "--budget-calibrated-seconds 0.0: must be positive" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--seeds", "1,x"]) == 2
    assert "--seeds '1,x': comma-separated integers" in caplog.text
    assert compare.main(["--budget-tokens", "100000", "--out", str(tmp_path), "--seeds", "1,1"]) == 2
    assert "--seeds 1,1: each seed once" in caplog.text
    with pytest.raises(SystemExit):  # argparse: exactly one budget
        compare.main(["--budget-tokens", "1", "--budget-seconds", "1", "--out", str(tmp_path)])
