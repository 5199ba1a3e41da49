"""The memory probe measures the regime the launcher trains in: a run at the micro-batch a CPU probe chose stays under
the cap the probe was given, by the same measure (growth of the peak RSS from just before the model is built).

The probe trains through the launcher's DeepSpeed engine with the run's ds_config (bf16 weights, fp32 master copy
and moments, ZeRO-2 buckets, fp32 accumulation). Checked to fail when the probe measures without ZeRO (DeepSpeed's
bf16 optimizer, torch AdamW): it then chose micro-batch 29, and the run at 24 grew 193.9 MiB over the 184.3 cap."""
import json
from pathlib import Path

from evidence import bench_lengths
from launcher.metrics import read_metrics

from launching import pretrain_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CAP_GB = 0.18
L = 64
TOKENS_PER_STEP = L * 240  # many divisors: the run's micro-batch comes close to the probe's answer


def test_a_run_at_the_probed_micro_batch_stays_under_the_cap(tmp_path, tokenized, sp_model, launch):
    probe = tmp_path / "probe.json"
    assert bench_lengths.main(["--preset", "tiny", "--lengths", str(L), "--tokens-per-batch", str(4 * L),
                               "--vocab-size", "1000", "--steps", "1", "--repeats", "1", "--memory-cap-gb",
                               str(CAP_GB), "--json", str(probe)]) == 0
    row = json.loads(probe.read_text())["lengths"][0]
    cap = CAP_GB * (1 << 30)
    assert row["max_micro_batch"] >= 4 and row["probe_checks"][-1]["peak_bytes"] <= cap
    marks, run_dir = tmp_path / "marks.json", tmp_path / "run"
    args = pretrain_args(run_dir, tokenized, sp_model, "data.valid_fraction=0", "model.preset=tiny",
                         f"growlength.tokens_per_step={TOKENS_PER_STEP}", "growlength.grad_accum=null",
                         f"growlength.stages=[{{seq_len: {L}, tokens: {2 * TOKENS_PER_STEP}}}]",
                         f"growlength.micro_batch_probe={probe}", "checkpointing.interval_steps=0",
                         "checkpointing.at_stage_end=false", cache_dir=tmp_path / "cache")
    proc = launch([marks, *args], script=HERE / "probe_run.py")  # the launcher in a process that records its RSS
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in read_metrics(run_dir) if "kind" not in r]
    mb = steps[0]["micro_batch_size"]
    assert len(steps) == 2 and mb * L <= row["max_tokens_per_batch"] and mb >= 0.6 * row["max_micro_batch"]
    m = json.loads(marks.read_text())
    growth = m["peak"] - m["base"]
    print(f"probe max micro_batch {row['max_micro_batch']}, run micro_batch {mb}: peak RSS grew "
          f"{growth / 2**20:.1f} MiB, cap {cap / 2**20:.1f} MiB")  # measured: 14, 12, 173.2 of 184.3 MiB
    assert growth <= cap, (f"micro_batch {mb} (probe: {row['max_micro_batch']}) grew the peak RSS by "
                           f"{growth / 2**20:.1f} MiB, over the probe's cap {cap / 2**20:.1f} MiB")


def test_probe_flag_errors(tmp_path, caplog):
    assert bench_lengths.main(["--lengths", "64", "--ranks", "0"]) == 2
    assert "--ranks 0: must be at least 1" in caplog.text
    assert bench_lengths.main(["--lengths", "64", "--ds_config", str(tmp_path / "nope.json")]) == 2
    assert f"--ds_config {tmp_path / 'nope.json'}: no such file; the shipped ones are in ds_configs/" in caplog.text


def test_probe_config_is_the_runs_with_the_probes_batch():
    cfg = bench_lengths.probe_ds_config(str(ROOT / "ds_configs/zero2_offload.json"), None, micro_batch=3, world=2)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "scheduler" not in cfg
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (3, bench_lengths.ACCUMULATION, 3 * bench_lengths.ACCUMULATION * 2)
    fp32 = bench_lengths.probe_ds_config(str(ROOT / "ds_configs/zero2.json"), "fp32", 1, 1)
    assert fp32["bf16"] == {"enabled": False}
