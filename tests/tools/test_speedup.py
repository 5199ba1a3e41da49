"""The claim's arithmetic on hand-made inputs: the predicted time ratio from a hand-made cost table, and the realized
clocks and time to a loss read from hand-made metrics.jsonl files (evidence.speedup, evidence.compare_report)."""
import json
from pathlib import Path

import pytest

from evidence import compare, compare_report, speedup
from evidence.runs import EvidenceError, load_run
from launcher import steptime

# seconds per optimizer step at each length (the per-token ratios of a 4-layer, 128-wide model on a CPU)
COST = {128: 1.0, 512: 1.11, 2048: 1.39, 4096: 1.89}
PLAN = [{"seq_len": 128, "tokens": 4000}, {"seq_len": 512, "tokens": 3000}, {"seq_len": 2048, "tokens": 2000},
        {"seq_len": 4096, "tokens": 1000}]


def test_predicted_ratio_from_a_hand_made_cost_table():
    # token shares 0.4 / 0.3 / 0.2 / 0.1: (0.4 * 1 + 0.3 * 1.11 + 0.2 * 1.39 + 0.1 * 1.89) / 1.89 = 1.2 / 1.89
    assert speedup.token_shares(PLAN) == pytest.approx({128: 0.4, 512: 0.3, 2048: 0.2, 4096: 0.1})
    assert speedup.predicted_ratio(PLAN, COST, 4096) == pytest.approx(1.2 / 1.89)
    # two stages at one length add up; the shares are of tokens, not of stages
    split = [{"seq_len": 128, "tokens": 1000}, {"seq_len": 128, "tokens": 1000}, {"seq_len": 4096, "tokens": 6000}]
    assert speedup.predicted_ratio(split, COST, 4096) == pytest.approx((0.25 * 1.0 + 0.75 * 1.89) / 1.89)
    assert speedup.predicted_ratio([{"seq_len": 4096, "tokens": 10}], COST, 4096) == 1.0
    assert speedup.predicted_ratio([{"seq_len": 128, "tokens": 10}], COST, 4096) == pytest.approx(1 / 1.89)


def test_predictions_range_over_calibration_rounds():
    """One timed step per length and round: round A {128: 1, 4096: 2}, round B {128: 1, 4096: 4}. Half the tokens
    at each length: A 0.75, B 0.625; the medians (1, 3) give 2 / 3."""
    times = steptime.summarize([{128: [1.0], 4096: [2.0]}, {128: [1.0], 4096: [4.0]}])
    plans = {"fixed-long": [{"seq_len": 4096, "tokens": 2000}],
             "growlength": [{"seq_len": 128, "tokens": 1000}, {"seq_len": 4096, "tokens": 1000}]}
    got = compare.predictions(plans, times)
    assert got["growlength"] == {"ratio": pytest.approx(2 / 3), "min": pytest.approx(0.625),
                                 "max": pytest.approx(0.75), "token_shares": {"128": 0.5, "4096": 0.5}}
    assert (got["fixed-long"]["ratio"], got["fixed-long"]["min"], got["fixed-long"]["max"]) == (1.0, 1.0, 1.0)


# ---- realized, from hand-made metrics.jsonl ------------------------------------------------------------------
def step(n, stage, seq_len, step_s, elapsed):
    return {"step": n, "stage": stage, "seq_len": seq_len, "tokens_per_step": 1000, "tokens_seen": 1000 * n,
            "loss": 9.0, "tokens_per_s": 1000 / step_s, "elapsed_s": elapsed}


def stage(n, index, seq_len, switch_s):
    return {"kind": "stage", "step": n, "stage": index, "seq_len": seq_len, "tokens_seen": 1000 * n,
            "elapsed_s": 0.0, "switch_s": switch_s}


def val(n, loss, **other):
    return {"kind": "eval", "step": n, "val_loss_4096": loss, **other}


def write_run(root: Path, name: str, records: list[dict]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "train.log").write_text("")
    return d


def growlength(losses):
    """128 for steps 1-2 (1 s, 2 s), a 0.25 s switch, 4096 for steps 3-4 (4 s each); evals after steps 2, 3, 4.
    Training clock 1.5, 3.5, 7.75, 11.75 (0.5 s switch into stage 0 too); calibrated at {128: 1, 4096: 3}:
    1, 2, 5, 8. Evaluations at elapsed times that differ from both (they include start-up and evaluations)."""
    return [stage(0, 0, 128, 0.5), step(1, 0, 128, 1.0, 10), step(2, 0, 128, 2.0, 20),
            val(2, losses[0], val_loss_128=1.0), stage(2, 1, 4096, 0.25), step(3, 1, 4096, 4.0, 30), val(3, losses[1]),
            step(4, 1, 4096, 4.0, 40), val(4, losses[2])]


def fixed_long(losses):
    """4096 for steps 1-4 (4 s each, no switch time): training clock 4, 8, 12, 16; calibrated 3, 6, 9, 12."""
    return [stage(0, 0, 4096, 0.0), *[step(n, 0, 4096, 4.0, 10 * n) for n in (1, 2)], val(2, losses[0]),
            *[step(n, 0, 4096, 4.0, 10 * n) for n in (3, 4)], val(4, losses[1])]


CALIBRATED = {128: 1.0, 4096: 3.0}


def test_clocks_and_curve_from_hand_made_metrics(tmp_path):
    run = load_run(write_run(tmp_path, "g", growlength([5.0, 4.0, 3.0])))
    assert speedup.training_clock(run) == pytest.approx({1: 1.5, 2: 3.5, 3: 7.75, 4: 11.75})
    assert speedup.calibrated_clock(run.steps, CALIBRATED) == {1: 1.0, 2: 2.0, 3: 5.0, 4: 8.0}
    curve = speedup.validation_curve(run, 4096, CALIBRATED)
    assert [(p["step"], p["tokens_seen"], p["loss"], p["elapsed_s"]) for p in curve] == \
        [(2, 2000, 5.0, 20), (3, 3000, 4.0, 30), (4, 4000, 3.0, 40)]
    assert [p["train_s"] for p in curve] == pytest.approx([3.5, 7.75, 11.75])
    assert [p["calibrated_s"] for p in curve] == [2.0, 5.0, 8.0]
    # 3.5 lies halfway between the evaluations after steps 3 (4.0) and 4 (3.0)
    assert speedup.time_to_loss(curve, 3.5, "train_s") == pytest.approx(7.75 + 0.5 * 4.0)
    assert speedup.time_to_loss(curve, 3.5, "calibrated_s") == pytest.approx(6.5)
    assert speedup.time_to_loss(curve, 3.5, "tokens_seen") == pytest.approx(3500)
    assert speedup.time_to_loss(curve, 3.0, "train_s") == pytest.approx(11.75)   # reached exactly at the end
    assert speedup.time_to_loss(curve, 6.0, "train_s") == pytest.approx(3.5)     # already at the first evaluation
    assert speedup.time_to_loss(curve, 2.9, "train_s") is None                   # never reached
    assert speedup.validation_curve(run, 2048, CALIBRATED) == []                # no loss at that length


def test_loss_at():
    curve = [{"t": 1.0, "loss": 5.0}, {"t": 3.0, "loss": 3.0}]
    assert speedup.loss_at(curve, 2.0, "t") == pytest.approx(4.0)
    assert speedup.loss_at(curve, 3.0, "t") == 3.0 and speedup.loss_at(curve, 0.5, "t") is None
    assert speedup.loss_at(curve, 3.5, "t") is None


def test_summary_reads_time_to_target_from_hand_made_runs(tmp_path):
    """Two seeds. Seed 1: GrowLength reaches fixed-long's final 3.5 at 9.75 training s (6.5 calibrated) against
    fixed-long's 16 (12). Seed 2: GrowLength never gets below 4.6: not reached, and the per-plan figures say 1 of 2."""
    runs_dir = tmp_path / "runs"
    dirs = {("fixed-long", 1): write_run(runs_dir, "fixed-long-seed1", fixed_long([4.5, 3.5])),
            ("growlength", 1): write_run(runs_dir, "growlength-seed1", growlength([5.0, 4.0, 3.0])),
            ("fixed-long", 2): write_run(runs_dir, "fixed-long-seed2", fixed_long([4.4, 3.4])),
            ("growlength", 2): write_run(runs_dir, "growlength-seed2", growlength([5.0, 4.8, 4.6]))}
    s = compare.Setup(out=tmp_path, budget_seconds=None, budget_tokens=4000, lengths=[128, 4096],
                      shares=[0.5, 0.5], tokens_per_step=1000, plans=("fixed-long", "growlength"), seeds=[1, 2])
    runs = {key: load_run(d, s.run_name(*key)) for key, d in dirs.items()}
    summary = compare_report.summarise(s, runs, CALIBRATED)
    f1, g1, g2 = (summary["runs"][n] for n in ("fixed-long-seed1", "growlength-seed1", "growlength-seed2"))
    assert (f1["target_val_loss"], g1["target_val_loss"], g2["target_val_loss"]) == (3.5, 3.5, 3.4)
    assert (f1["to_target_train_s"], f1["to_target_calibrated_s"]) == pytest.approx((16.0, 12.0))
    assert (g1["to_target_train_s"], g1["to_target_calibrated_s"], g1["to_target_tokens"]) == \
        pytest.approx((9.75, 6.5, 3500))
    assert g2["to_target_train_s"] is None and g2["to_target_calibrated_s"] is None
    assert (g1["train_s"], g1["calibrated_s"], g1["elapsed_s"]) == pytest.approx((11.75, 8.0, 40))
    assert g1["vs_fixed_long"] == pytest.approx({"same_tokens_train": 11.75 / 16, "same_tokens_calibrated": 8 / 12,
                                                 "to_target_train": 9.75 / 16, "to_target_calibrated": 6.5 / 12})
    assert g2["vs_fixed_long"]["to_target_train"] is None
    to_target = summary["by_plan"]["growlength"]["to_target_train"]
    assert (to_target["median"], to_target["n"], to_target["of"]) == (pytest.approx(9.75 / 16), 1, 2)
    sooner = [c for c in summary["conclusions"] if c["claim"].startswith("reaches")][0]
    assert sooner["wins"] == {"wall-clock": 1, "calibrated time": 1} and sooner["verdict"] == "mixed"
    summary["predicted"] = {"fixed-long": {"ratio": 1.0, "min": 1.0, "max": 1.0, "token_shares": {"4096": 1.0}},
                            "growlength": {"ratio": 0.6, "min": 0.5, "max": 0.7,
                                           "token_shares": {"128": 0.5, "4096": 0.5}}}
    report = compare_report.markdown(summary, "python -m evidence.compare ...", [])
    row = next(line for line in report.splitlines() if line.startswith("| growlength | 128: 0.50"))
    assert "0.600x (0.500-0.700)" in row and f"{9.75 / 16:.3f} ({9.75 / 16:.3f}-{9.75 / 16:.3f}, 1/2 reached)" in row


def test_summary_refuses_a_reference_without_validation(tmp_path):
    d = write_run(tmp_path, "fixed-long", [stage(0, 0, 4096, 0.0), step(1, 0, 4096, 4.0, 10)])
    s = compare.Setup(out=tmp_path, budget_seconds=None, budget_tokens=1000, lengths=[128, 4096], shares=[0.5, 0.5],
                      tokens_per_step=1000, plans=("fixed-long",))
    with pytest.raises(EvidenceError, match="no validation loss at L=4096 .* raise --valid-fraction"):
        compare_report.summarise(s, {("fixed-long", 1234): load_run(d)}, CALIBRATED)


def test_run_order_turns_by_one_per_seed():
    s = compare.Setup(out=Path("."), budget_seconds=None, budget_tokens=1000, lengths=[128, 4096],
                      shares=[0.5, 0.5], plans=("fixed-short", "fixed-long", "growlength"))
    assert [compare.run_order(s, i) for i in range(4)] == [
        ["fixed-long", "fixed-short", "growlength"], ["fixed-short", "growlength", "fixed-long"],
        ["growlength", "fixed-long", "fixed-short"], ["fixed-long", "fixed-short", "growlength"]]
