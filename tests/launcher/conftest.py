"""The in-process launcher fixture: ``run(*overrides)`` calls ``launcher.pretrain.main`` as rank 0 of 1 (gloo) on
the session's tiny corpus and returns ``(exit code, stdout)``."""
import pytest

from launcher import pretrain

from launcher.net import free_port

from runner import pretrain_ds_config


@pytest.fixture
def run(monkeypatch, tmp_path, tokenized, sp_model, capsys):
    port = free_port()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"

    def go(*args, prefix=tokenized, tokenizer=sp_model, ds_config=None, run_dir=run_dir):
        argv = ["--ds_config", ds_config or str(pretrain_ds_config()), f"run_dir={run_dir}",
                f"data.prefix={prefix}", f"data.tokenizer={tokenizer}", f"data.cache_dir={tmp_path}/cache",
                "growlength.tokens_per_step=1024", "growlength.stages=[{seq_len: 32, tokens: 2048}]",
                "data.valid_fraction=0.1", "logging.tensorboard=false", *args]
        code = pretrain.main(argv)
        out = capsys.readouterr().out
        return code, out

    go.run_dir = run_dir
    return go
