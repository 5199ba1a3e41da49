"""The memory probe measures the regime the launcher trains in: a run at the micro-batch a CPU probe chose stays under
the cap the probe was given, by the same measure (growth of the peak RSS from just before the model is built).

The probe trains through the launcher's DeepSpeed engine with the run's ds_config (bf16 weights and fp32 master
copy and moments, ZeRO-2 gradient buckets); the bare bf16 step it used to time (bf16 AdamW, no master weights, no
buckets) left out the ~100 MiB those buckets take here, so it chose micro-batches that ran over the cap."""
import json
import os
import subprocess
import sys
from pathlib import Path

from evidence import bench_lengths
from launcher.metrics import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CAP_GB = 0.16
L = 64
TOKENS_PER_STEP = L * 720  # 720 has many divisors: the run's micro-batch can come close to the probe's cap


def test_a_run_at_the_probed_micro_batch_stays_under_the_cap(tmp_path, tokenized, sp_model):
    probe = tmp_path / "probe.json"
    assert bench_lengths.main(["--preset", "tiny", "--lengths", str(L), "--tokens-per-batch", str(4 * L),
                               "--vocab-size", "1000", "--steps", "1", "--repeats", "1", "--memory-cap-gb",
                               str(CAP_GB), "--json", str(probe)]) == 0
    row = json.loads(probe.read_text())["lengths"][0]
    cap = CAP_GB * (1 << 30)
    assert row["max_micro_batch"] >= 4 and row["probe_checks"][-1]["peak_bytes"] <= cap
    marks, run_dir = tmp_path / "marks.json", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS=str(os.cpu_count() or 1), GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(
        [sys.executable, str(HERE / "probe_run.py"), str(marks), "--ds_config", "ds_configs/zero2.json",
         f"run_dir={run_dir}", f"data.prefix={tokenized}", f"data.tokenizer={sp_model}", "data.valid_fraction=0",
         f"data.cache_dir={tmp_path}/cache", "model.preset=tiny", "logging.tensorboard=false",
         f"growlength.tokens_per_step={TOKENS_PER_STEP}", "growlength.grad_accum=null",
         f"growlength.stages=[{{seq_len: {L}, tokens: {2 * TOKENS_PER_STEP}}}]",
         f"growlength.micro_batch_probe={probe}", "checkpointing.interval_steps=0", "checkpointing.at_stage_end=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in read_metrics(run_dir) if "kind" not in r]
    mb = steps[0]["micro_batch_size"]
    assert len(steps) == 2 and mb * L <= row["max_tokens_per_batch"] and mb >= 0.6 * row["max_micro_batch"]
    m = json.loads(marks.read_text())
    growth = m["peak"] - m["base"]
    assert growth <= cap, (f"micro_batch {mb} (probe: {row['max_micro_batch']}) grew the peak RSS by "
                           f"{growth / 2**20:.1f} MiB, over the probe's cap {cap / 2**20:.1f} MiB")
