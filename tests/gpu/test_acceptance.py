"""The GPU acceptance run, benchmarks/gpu_acceptance.py at full size, as `make test-gpu` runs it: every correctness
check passes on this GPU, every figure is there and labelled, the whole run fits in 8 minutes. Skipped without CUDA
(the CPU rehearsal of the same code is tests/benchmarks/test_gpu_acceptance.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (make test-gpu on a GPU machine)")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory, spawns):
    report = tmp_path_factory.mktemp("acceptance") / "acceptance.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GROWLENGTH_FAULT", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--json", str(report)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the table, shown by pytest -rA or on failure
    assert report.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(report.read_text())
    return proc, data, {c["name"]: c for c in data["checks"]}


def test_every_check_ran_and_the_correctness_checks_passed(acceptance):
    proc, data, checks = acceptance
    assert list(checks) == ["parity", "throughput", "switch", "probe", "compare"]
    flash_missing = data["labels"]["flash_attn_usable"] != "yes"
    for name, c in checks.items():
        if name == "parity" and flash_missing:
            assert c["status"] == "skipped" and "flash-attn" in c["reason"]
            continue
        assert c["status"] == "passed", (name, c["reason"])
    assert proc.returncode == 0, data["table"]


def test_the_whole_run_fits_in_8_minutes(acceptance):
    assert acceptance[1]["seconds"] < 480, acceptance[1]["table"]


def test_figures_are_labelled_with_this_machine(acceptance):
    lab = acceptance[1]["labels"]
    assert lab["gpu"] == torch.cuda.get_device_name() and lab["gpu_count"] == torch.cuda.device_count()
    assert lab["torch"] == torch.__version__ and lab["cuda"] == torch.version.cuda and lab["flash_attn"]
    assert f"CUDA {torch.version.cuda}" in acceptance[0].stdout


def test_parity_at_2048_in_bf16(acceptance):
    c = acceptance[2]["parity"]
    if c["status"] == "skipped":
        pytest.skip(c["reason"])
    f = c["figures"]
    assert f["preset"] == "pythia-160m" and f["seq_len"] == 2048
    assert f["flash_max_abs_err_vs_fp32"] <= 2 * f["sdpa_max_abs_err_vs_fp32"]


def test_throughput_at_every_length_ours_and_transformers(acceptance):
    f = acceptance[2]["throughput"]["figures"]
    assert list(f["lengths"]) == ["128", "256", "512", "1024", "2048", "4096"] and "hf" in f["models"]
    for L, cells in f["lengths"].items():
        for name in f["models"]:
            c = cells[name]
            assert "oom" in c or (c["tokens_per_s"] > 0 and (f["peak_tflops"] is None or
                                                            0 < c["mfu_causal"] < c["mfu_palm"] < 1)), (L, name)
    e = f["engine"]
    assert (e["seq_len"], e["precision"], e["zero_stage"]) == (2048, "bf16", 1) and e["tokens_per_s"] > 0


def test_the_targets_are_reported_with_a_verdict(acceptance):
    goals = {g["target"]: g for g in acceptance[1]["targets"]}
    assert len(goals) == 3 and not any(g["dry_run"] for g in goals.values())
    assert goals["tokens_per_s_vs_transformers"]["met"] in (True, False)


def test_switch_ran_on_nccl_over_every_gpu(acceptance):
    f = acceptance[2]["switch"]["figures"]
    assert f["backend"] == "nccl" and f["ranks"] == torch.cuda.device_count()
    assert all(f["resume_bitwise"].values())


def test_probe_run_fit_and_its_peaks_are_within_the_gpu(acceptance):
    f = acceptance[2]["probe"]["figures"]
    for L, st in f["stages"].items():
        assert 0 < st["peak_bytes"] <= f["capacity_bytes"], L


def test_compare_reports_both_losses_on_at_most_one_epoch(acceptance):
    f = acceptance[2]["compare"]["figures"]
    assert all(math.isfinite(r["val_loss_long"]) for r in f["runs"].values())
    assert f["epochs_per_run"] <= 1 and f["can_show"] and f["cannot_show"]
