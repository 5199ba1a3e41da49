"""The launcher tests' runs: ``train`` (the ``train`` fixture) is ``deepspeed --num_gpus N launcher/pretrain.py`` on CPU
ranks (gloo) with the 3-stage ``PLAN``; ``steps`` and ``ok`` read what a run wrote and how it ended."""
from launching import ZERO2, launch, pretrain_args
from launcher import pretrain
from launcher.metrics import read_metrics

# 3 stages of 6 steps each at 1024 tokens/step on 2 ranks: micro-batches 16, 8, 4
PLAN = ["growlength.tokens_per_step=1024", "growlength.stages=[{seq_len: 32, tokens: 6144}, "
        "{seq_len: 64, tokens: 6144}, {seq_len: 128, tokens: 6144}]"]


def train(run_dir, prefix, tokenizer, *extra, ranks=2, fault=None, ds_config=ZERO2):
    """The deepspeed runner (even for one rank) on the test corpus: PLAN, checkpoints every 4 steps, then ``extra``."""
    args = pretrain_args(run_dir, prefix, tokenizer, "checkpointing.interval_steps=4", "checkpointing.keep_last=10",
                         "logging.eval_tokens=2048", *PLAN, *extra, ds_config=ds_config)
    return launch(args, ranks=ranks, runner=True, fault=fault)


def steps(run_dir) -> dict[int, dict]:
    records = [r for r in read_metrics(run_dir) if "kind" not in r]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), "a step was logged twice"
    return by_step


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def assert_refused(result, message, run_dir=None):
    code, out = result
    assert code == pretrain.EXIT_BAD_INPUT, out
    assert message in out, out
    if run_dir is not None:
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
