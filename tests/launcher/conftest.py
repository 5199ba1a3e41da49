"""The launcher tests' two ways in: ``run(*overrides)`` calls ``launcher.pretrain.main`` in this process as rank 0 of 1
(gloo) on the session's tiny corpus and returns ``(exit code, stdout)``; ``train`` is runner.train, the deepspeed
runner in a subprocess (requesting it marks a test slow)."""
import pytest

from launching import pretrain_args, run_in_process


@pytest.fixture
def run(tmp_path, tokenized, sp_model, capsys):
    run_dir = tmp_path / "run"

    def go(*args, prefix=tokenized, tokenizer=sp_model, ds_config=None, run_dir=run_dir, **main_kwargs):
        argv = pretrain_args(run_dir, prefix, tokenizer, "growlength.tokens_per_step=1024",
                             "growlength.stages=[{seq_len: 32, tokens: 2048}]", *args,
                             cache_dir=tmp_path / "cache", **({"ds_config": ds_config} if ds_config else {}))
        code = run_in_process(argv, **main_kwargs)
        return code, capsys.readouterr().out

    go.run_dir = run_dir
    return go


@pytest.fixture(scope="session")
def train(spawns):
    from runner import train
    return train
