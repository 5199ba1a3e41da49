"""benchmarks/gpu_acceptance.py where there is no GPU: its --dry-run runs every check on the CPU at tiny size (real
launcher runs on gloo, real bench_lengths and compare, real transformers), so the script cannot rot; and its
command-line errors.

One dry run per module (a subprocess, as a user starts it); the tests read its table and JSON.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


acc = _module()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, spawns):
    tmp = tmp_path_factory.mktemp("acceptance")
    report = tmp / "acceptance.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GROWLENGTH_FAULT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(report), "--out", str(tmp / "work"),
                           "--builtin-dir", str(tmp / "builtin")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    return proc, data, {c["name"]: c for c in data["checks"]}


def test_dry_run_runs_every_check_and_prints_one_labelled_table(dry_run):
    proc, data, checks = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert list(checks) == list(acc.CHECKS)
    assert {n: c["status"] for n, c in checks.items()} == {"parity": "skipped", "throughput": "passed",
                                                          "switch": "passed", "probe": "passed", "compare": "passed"}
    assert "flash-attn" in checks["parity"]["reason"]  # skipped, and why
    assert data["dry_run"] is True and data["exit_code"] == 0
    lab = data["labels"]
    import torch
    assert lab["torch"] == torch.__version__ and lab["gpu"] == "none (CPU)" and lab["flash_attn"]
    out = proc.stdout
    assert out.count("GPU acceptance (DRY RUN") == 1 and f"torch {torch.__version__}" in out
    for name, c in checks.items():
        assert c["seconds"] <= c["budget_s"] + 5, name
        assert any(line.startswith(f"{name:<11} {c['status']}") for line in out.splitlines()), name
    assert "5 checks in" in out and "1 skipped; exit 0" in out
    assert data["table"] in out
    assert data["seconds"] <= data["timeout_s"] + 10  # the budgets are shares of --timeout-s


def test_dry_run_parity_measures_sdpa_bf16_against_fp32(dry_run):
    f = dry_run[2]["parity"]["figures"]
    assert f["seq_len"] == 64 and f["dtype"] == "bf16"
    # bf16 rounding of a random tiny model: above zero (it is a real bf16 forward), far below the logits' scale
    assert 0 < f["sdpa_max_abs_err_vs_fp32"] < 0.1 * f["max_abs_logit_fp32"]


def test_dry_run_throughput_reuses_the_model_benchmark_with_a_launcher_cell(dry_run):
    f = dry_run[2]["throughput"]["figures"]
    assert list(f["lengths"]) == ["32", "64"] and f["models"] == ["ours", "hf"]  # no flash-attn on a CPU
    bench = json.loads(Path(f["report"]).read_text())  # benchmarks/bench_model.py's own JSON
    assert {str(r["seq_len"]): r["models"] for r in bench["lengths"]} == f["lengths"]
    for L, cells in f["lengths"].items():
        for name, c in cells.items():
            assert c["tokens_per_s"] == pytest.approx(256 / c["step_s"]), (L, name)
            assert 0 < c["mfu_causal"] < c["mfu_palm"], (L, name)  # causal counts about half the attention term
    e = f["engine"]
    assert (e["ds_config"], e["zero_stage"], e["precision"], e["seq_len"], e["tokens_per_step"]) == \
        (acc.DS_CONFIG, 1, "bf16", 64, 512)
    assert e["tokens_per_s"] > 0 and e["steps"] == 1 and math.isfinite(e["loss"])


def test_dry_run_switch_changes_accumulation_and_resumes_exactly(dry_run):
    f = dry_run[2]["switch"]["figures"]
    assert f["backend"] == "gloo" and f["ranks"] == 1
    assert f["micro_batches"]["accum4"] == [[16, 1]] * 2 + [[2, 4]] * 4
    assert f["micro_batches"]["accum1"] == [[16, 1]] * 2 + [[8, 1]] * 4
    assert f["max_rel_diff"]["loss"] <= f["rtol"]["loss"] and f["max_rel_diff"]["grad_norm"] <= f["rtol"]["grad_norm"]
    assert f["recomputed_steps"] == [4, 5] and all(f["resume_bitwise"].values())
    assert f["resume_max_abs_loss_diff"] == 0


def test_dry_run_probe_then_a_launcher_run_at_the_probed_micro_batch(dry_run):
    f = dry_run[2]["probe"]["figures"]
    from launcher.plan import max_tokens_per_micro_batch
    probe = {"lengths": [{"seq_len": int(L), **r} for L, r in f["probe"].items()]}
    assert f["tokens_per_step"] == max_tokens_per_micro_batch(probe, 64)
    for L, st in f["stages"].items():
        (mb, accum), = st["micro_batch_and_accum"]
        assert mb * int(L) <= f["probe"][L]["max_tokens_per_batch"], L  # within what the probe measured to fit
        assert mb * int(L) * accum == f["tokens_per_step"] and st["steps"] == 2
        assert st["peak_bytes"] > 0
    (mb, _), = f["stages"]["64"]["micro_batch_and_accum"]
    assert mb * 64 == max_tokens_per_micro_batch(probe, 64)  # the longest stage runs at exactly its cap


def test_dry_run_compare_trains_at_most_one_epoch_of_the_installed_packages_text(dry_run):
    f = dry_run[2]["compare"]["figures"]
    assert f["lengths"] == [32, 64] and "installed Python packages" in f["corpus"]["source"]
    assert f["corpus"]["tokens"] > 100_000 and f["epochs_per_run"] <= 1
    assert f["budget_tokens"] <= f["epoch_tokens"] == int(f["corpus"]["tokens"] * (1 - acc.VALID_FRACTION))
    runs = f["runs"]
    for name in ("growlength", "fixed-long"):
        assert math.isfinite(runs[name]["val_loss_long"]) and runs[name]["tokens_seen"] == f["budget_tokens"], name
    assert f["target_val_loss"] == runs["fixed-long"]["val_loss_long"]
    reached = runs["growlength"]["to_target_train_s"]  # the training clock: evaluations excluded
    assert f["time_to_target_ratio"] == (None if reached is None else reached / runs["fixed-long"]["train_s"])
    assert f["can_show"] and f["cannot_show"] and Path(f["report"]).is_file()


def test_dry_run_reports_the_targets_without_claiming_them(dry_run):
    goals = {g["target"]: g for g in dry_run[1]["targets"]}
    assert set(goals) == set(acc.TARGETS) and all(g["dry_run"] for g in goals.values())
    assert goals["mfu_causal"]["value"] is None and goals["mfu_causal"]["met"] is None  # no peak for a CPU
    tp = dry_run[2]["throughput"]["figures"]["lengths"]["64"]
    assert goals["tokens_per_s_vs_transformers"]["value"] == tp["ours"]["tokens_per_s"] / tp["hf"]["tokens_per_s"]
    assert "targets (one H100/H200" in dry_run[0].stdout


def test_budgets_are_shares_of_the_time_left():
    import time
    ctx = acc.Context(sizes=acc.GPU, out=Path("."), ranks=1, cuda=False, dry_run=True,
                      deadline=time.monotonic() + 1000)
    assert acc.budget_for(ctx, "parity", list(acc.CHECKS)) == pytest.approx(50, abs=1)
    assert acc.budget_for(ctx, "switch", ["switch", "compare"]) == pytest.approx(1000 / 3, abs=1)
    assert acc.budget_for(ctx, "compare", ["compare"]) == pytest.approx(1000, abs=1)  # the last gets what is left
    for sizes in (acc.GPU, acc.DRY):
        assert sum(sizes.shares.values()) == pytest.approx(1) and set(sizes.shares) == set(acc.CHECKS)


def test_exit_code_is_nonzero_when_a_check_fails():
    passed, skipped = acc.Result("switch"), acc.Result("parity", "skipped", "no flash")
    assert acc.exit_code([passed, skipped]) == 0
    assert acc.exit_code([passed, acc.Result("parity").fail("flash-attn's logits are off")]) == 1
    assert acc.exit_code([passed, acc.Result("compare", "error", "RuntimeError: boom")]) == 1


@pytest.mark.parametrize("args, message", [
    (["--checks", "parity,speed"], "--checks 'parity,speed': unknown ['speed']; choose from parity,throughput"),
    (["--timeout-s", "0"], "--timeout-s 0: must be positive"),
    (["--json", "{tmp}/afile/a.json"], "--json {tmp}/afile/a.json: {tmp}/afile is a file, not a directory"),
    (["--data-prefix", "corpus"], "--data-prefix and --tokenizer go together"),
    (["--data-prefix", "{tmp}/corpus", "--tokenizer", "t.model"], "--data-prefix {tmp}/corpus: no {tmp}/corpus.idx"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    argv = ["--dry-run", "--out", str(tmp_path / "w"), *args]
    if "--json" not in args:
        argv += ["--json", str(tmp_path / "a.json")]
    assert acc.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "a.json").exists()


def test_without_a_gpu_the_full_run_asks_for_dry_run(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert acc.main(["--json", str(tmp_path / "a.json"), "--out", str(tmp_path / "w")]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err and not (tmp_path / "w").exists()
