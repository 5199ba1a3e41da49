"""Run the launcher as its users do, `deepspeed --num_gpus N launcher/pretrain.py ...`, on CPU ranks (gloo),
and read what it wrote. Shared by the launcher tests."""
import os
import subprocess
from pathlib import Path

from evidence.launch import launch_command
from launcher import pretrain
from launcher.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]

# 3 stages of 6 steps each at 1024 tokens/step on 2 ranks: micro-batches 16, 8, 4
PLAN = ["growlength.tokens_per_step=1024", "growlength.stages=[{seq_len: 32, tokens: 6144}, "
        "{seq_len: 64, tokens: 6144}, {seq_len: 128, tokens: 6144}]"]


def train(run_dir, prefix, tokenizer, *extra, ranks=2, fault=None, ds_config="ds_configs/zero2.json"):
    """`deepspeed --num_gpus RANKS launcher/pretrain.py` (the runner even for one rank) on the test corpus."""
    cmd, env = launch_command(ranks, runner=True, env=dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))
    env.pop("GROWLENGTH_FAULT", None)
    if fault:
        env["GROWLENGTH_FAULT"] = fault
    cmd += ["--ds_config", ds_config, f"run_dir={run_dir}", f"data.prefix={prefix}",
           f"data.tokenizer={tokenizer}", "data.valid_fraction=0.1", f"data.cache_dir={run_dir}/../index-cache",
           "checkpointing.interval_steps=4", "checkpointing.keep_last=10", "logging.log_interval=1",
           "logging.tensorboard=false", "logging.eval_tokens=2048", *PLAN, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def steps(run_dir) -> dict[int, dict]:
    records = [r for r in read_metrics(run_dir) if "kind" not in r]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), "a step was logged twice"
    return by_step


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def pretrain_ds_config():
    return Path(pretrain.__file__).resolve().parents[1] / "ds_configs" / "zero2.json"


def assert_refused(result, message, run_dir=None):
    code, out = result
    assert code == pretrain.EXIT_BAD_INPUT, out
    assert message in out, out
    if run_dir is not None:
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
