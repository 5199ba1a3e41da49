"""Bad run configs and ds_configs: every field type-checked from its annotation, every problem named with the field
(or file and key), the value and the fix, all problems of one config reported together; a few through
``pretrain.main`` (exit code 2, nothing of the run written)."""
import json
from pathlib import Path

import pytest

from launcher import pretrain
from launcher.config import ConfigError, DataConfig, LoggingConfig, RunConfig, check_value, load_config
from launcher.ds_config import DSConfigError, check_ds_config, load_ds_config

ROOT = Path(__file__).resolve().parents[2]
ZERO2 = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())


# ---- every field against its annotation -------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("growlength.stages=[{seq_len: 64.5, tokens: 4096}]",
     r"growlength.stages\[0\].seq_len must be an integer, got 64.5 \(write a whole number\)"),
    ("growlength.stages=[{seq_len: 64, tokens: '4096'}]", r"stages\[0\].tokens must be an integer, got '4096'"),
    ("growlength.stages=[{seq_len: 64, tokens: 0}]", r"stages\[0\].tokens must be >= 1, got 0"),
    ("growlength.stages=[{seq_len: 0, tokens: 4096}]", r"stages\[0\].seq_len must be >= 1, got 0"),
    ("growlength.stages=[{seq_len: 64, share: 1.5}]", r"stages\[0\].share must be in \(0, 1\], got 1.5"),
    ("growlength.stages=[{seq_len: 64, share: true}]", r"stages\[0\].share must be a number, got True"),
    ("growlength.stages=[{seq_len: 64, time_share: -0.2}]", r"stages\[0\].time_share must be in \(0, 1\], got -0.2"),
    ("growlength.stages=[64, 128]", r"growlength.stages\[0\] must be a mapping with seq_len, got 64"),
    ("growlength.stages={seq_len: 64}", r"growlength.stages must be a list, got \{'seq_len': 64\}"),
    ("checkpointing.resume_force='false'", "checkpointing.resume_force must be true or false, got 'false' "
                                           r"\(a quoted string: write true or false without quotes\)"),
    ("checkpointing.resume_force=1", "checkpointing.resume_force must be true or false, got 1"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing must be true or false or null, got "
                                             "'maybe'"),
    ("logging.tensorboard=0", "logging.tensorboard must be true or false, got 0"),
    ("growlength.tokens_per_step=abc", "growlength.tokens_per_step must be an integer, got 'abc'"),
    ("growlength.tokens_per_step=0", "growlength.tokens_per_step must be >= 1, got 0"),
    ("growlength.tokens_per_step=-5", "growlength.tokens_per_step must be >= 1, got -5"),
    ("growlength.tokens_per_step=1.5", "growlength.tokens_per_step must be an integer, got 1.5"),
    ("growlength.tokens_per_step=true", "growlength.tokens_per_step must be an integer, got True"),
    ("growlength.total_tokens=1e6", r"total_tokens must be an integer or null, got 1000000.0 \(an exponent makes "
                                    r"a float: write 1000000\)"),
    ("growlength.total_tokens='1000'", r"total_tokens must be an integer or null, got '1000' \(a string: remove the "
                                       r"quotes\)"),
    ("growlength.max_time_s=0", r"growlength.max_time_s must be > 0 or null, got 0"),
    ("growlength.max_tokens_per_micro_batch=-1", r"max_tokens_per_micro_batch must be >= 1 or null, got -1"),
    ("checkpointing.resume=yes", "checkpointing.resume must be auto, none or the path of a checkpoint or run "
                                 r"directory, got True \(YAML reads yes/no/on/off/true/false as booleans"),
    ("checkpointing.resume=no/such/run", "checkpointing.resume 'no/such/run': no such file or directory; give auto"),
    ("logging.eval_lengths=[0]", r"logging.eval_lengths\[0\] must be >= 1, got 0"),
    ("logging.eval_lengths=[128, 256.5]", r"logging.eval_lengths\[1\] must be an integer, got 256.5"),
    ("logging.eval_lengths=512", "logging.eval_lengths must be a list of integers, got 512"),
    ("logging.eval_tokens=-16", "logging.eval_tokens must be >= 1, got -16"),
    ("logging.eval_interval=-1", "logging.eval_interval must be >= 0, got -1"),
    ("logging.peak_tflops=0", "logging.peak_tflops must be > 0 or null, got 0"),
    ("optimisation.warmup_steps=-3", "optimisation.warmup_steps must be >= 0 or null, got -3"),
    ("optimisation.warmup_fraction=.nan", r"warmup_fraction must be a number, got nan"),
    ("data.valid_fraction=x", "data.valid_fraction must be a number, got 'x'"),
    ("data.prefix=5", "data.prefix must be a string or null, got 5"),
    ("model.num_kv_heads=[1]", r"model.num_kv_heads must be an integer or null, got \[1\]"),
    ("model.rope_base=ten", "model.rope_base must be a number or null, got 'ten'"),
    ("seed=-1", r"seed must be in \[0, 4294967296\), got -1"),
    ("run_dir=null", "run_dir must be a string, got None"),
    ("growlength.stages=[{seq_len: 64, tokens: 4096", "command-line override .*: the value is not valid YAML"),
])
def test_field_types_and_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_problem_reported_together(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: abc\ndata:\n  valid_fraction: 2\ngrowlength:\n  tokens_per_step: 0\n  stages:\n"
                 "    - {seq_len: 64.5, tokens: 8}\n    - {seq_len: 128, share: 0.5}\nlogging:\n  eval_lengths: [0]\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    lines = str(e.value).splitlines()
    assert lines[0] == "6 problems in the run config:"
    assert [line.strip() for line in lines[1:]] == [
        "data.valid_fraction must be in [0, 1), got 2",
        "growlength.tokens_per_step must be >= 1, got 0",
        "growlength.stages[0].seq_len must be an integer, got 64.5 (write a whole number)",
        "growlength.stages mix budget kinds ['share', 'tokens']: use one kind for all stages",
        "logging.eval_lengths[0] must be >= 1, got 0",
        "seed must be an integer, got 'abc'",
    ]


def test_good_values_pass_and_keep_their_types():
    cfg = load_config(None, ["growlength.total_tokens=2048", "growlength.max_time_s=30", "model.rope_base=500000",
                             "logging.eval_lengths=[128, 256]", "checkpointing.resume=none", "seed=0"])
    assert cfg.growlength.max_time_s == 30 and cfg.model.rope_base == 500000  # an int is a fine float
    assert cfg.logging.eval_lengths == [128, 256] and cfg.checkpointing.resume == "none" and cfg.seed == 0
    for f in (ROOT / "launcher" / "configs").glob("*.yaml"):  # every shipped preset passes the checks
        load_config(str(f))


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="logging.eval_tokens must be an integer, got '16k'"):
        LoggingConfig(eval_tokens="16k")
    with pytest.raises(ConfigError, match=r"data.epochs must be 'repeat' or 'error', got 'again'"):
        DataConfig(epochs="again")
    assert check_value("x", None, int | None) == [] and check_value("x", [1, 2], list[int], {"ge": 1}) == []
    assert check_value("x", [1, "2"], list[int]) == ["x[1] must be an integer, got '2' (a string: remove the quotes)"]


def test_config_file_cases(tmp_path):
    with pytest.raises(ConfigError, match=f"--config {tmp_path} is a directory; give a YAML file"):
        load_config(str(tmp_path))
    f = tmp_path / "list.yaml"
    f.write_text("- seed: 1\n- run_dir: x\n")
    with pytest.raises(ConfigError, match=f"--config {f} must hold a mapping of sections .* got a list"):
        load_config(str(f))
    f.write_bytes(b"seed: 1\nrun_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"--config {f}: cannot read it .*utf-8.*; give a readable UTF-8 YAML"):
        load_config(str(f))
    f.write_text("")  # empty: the defaults
    assert load_config(str(f)).run_dir == RunConfig().run_dir
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=f"run_dir {tmp_path}/afile/run: {tmp_path}/afile is a file, not a "
                                          f"directory; choose another run_dir"):
        load_config(None, [f"run_dir={tmp_path}/afile/run"])
    with pytest.raises(ConfigError, match=f"run_dir {tmp_path}/afile: .* is a file"):
        load_config(None, [f"run_dir={tmp_path}/afile"])


# ---- ds_config --------------------------------------------------------------------------------------------------
def with_(**changes) -> dict:
    cfg = json.loads(json.dumps(ZERO2))
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("cfg, message", [
    (with_(zero_optimization={"stage": 7}), "zero_optimization.stage is 7: DeepSpeed's ZeRO stages are 0, 1, 2 and "
                                            "3; this launcher ships and tests stages 1 and 2"),
    (with_(zero_optimization={"stage": "2"}), 'zero_optimization.stage is "2"'),
    (with_(optimizer=None), 'no "optimizer" section: .* add e.g. "optimizer": {"type": "AdamW"'),
    (with_(optimizer={"type": "Adamm", "params": {}}), 'optimizer.type is "Adamm": not an optimizer DeepSpeed knows; '
                                                       "use one of adagrad, adam, adamw"),
    (with_(optimizer={"params": {}}), "optimizer.type is null"),
    (with_(scheduler={"type": "Cosine"}), 'scheduler.type is "Cosine": not a scheduler DeepSpeed knows; use one of '
                                          "LRRangeTest, OneCycle, WarmupLR"),
    (with_(fp16={"enabled": True}), "fp16.enabled and bf16.enabled are both true; enable one"),
    (with_(bf16=True), "bf16 must be a JSON object, got true"),
    (with_(optimizer={"type": "AdamW", "params": [0.001]}), r"optimizer.params must be a JSON object, got \[0.001\]"),
])
def test_ds_config_refusals(cfg, message, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    before = path.read_bytes()
    with pytest.raises(DSConfigError, match=f"--ds_config {path}: {message}"):
        load_ds_config(str(path))
    assert path.read_bytes() == before


def test_ds_config_accepts_what_deepspeed_accepts(tmp_path):
    for f in (ROOT / "ds_configs").glob("*.json"):
        load_ds_config(str(f))
    check_ds_config(with_(optimizer={"type": "SGD", "params": {"lr": 0.1}}, scheduler=None))  # a torch.optim class
    check_ds_config(with_(optimizer={"type": "adam"}, scheduler={"type": "CosineAnnealingLR", "params": {}}))
    with pytest.raises(DSConfigError, match=r"has 2 problems:\n  zero_optimization must be a JSON object, got 2\n  "
                                            r"no \"optimizer\" section"):
        check_ds_config(with_(zero_optimization=2, optimizer=None), "x.json")
    with pytest.raises(DSConfigError, match=f"--ds_config {tmp_path} is a directory; give a JSON file"):
        load_ds_config(str(tmp_path))


# ---- through the launcher: exit code 2, nothing of the run written ----------------------------------------------
@pytest.fixture
def launch(run):
    """The in-process launcher of tests/launcher/conftest.py (rank 0 of 1)."""
    return run


def refused(result, message: str, run_dir: Path) -> None:
    code, out = result
    assert code == pretrain.EXIT_BAD_INPUT, out
    assert message in out, out
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_launcher_refuses_bad_types_before_anything(launch, tmp_path):
    refused(launch("--resume", "yes"), "checkpointing.resume must be auto, none or the path", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    refused(launch("checkpointing.resume_force='false'", "growlength.stages=[{seq_len: 64.5, tokens: 2048}]"),
            "2 problems in the run config", tmp_path / "run")
    refused(launch("model.activation_checkpointing=maybe"), "model.activation_checkpointing must be true or false",
            tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_launcher_refuses_a_run_dir_that_is_a_file(launch, tmp_path):
    f = tmp_path / "run.txt"
    f.write_text("my notes")
    code, out = launch(run_dir=f)
    assert code == 2 and f"run_dir {f}: {f} is a file, not a directory" in out
    assert f.read_text() == "my notes"


def test_launcher_refuses_zero_stage_7(launch, tmp_path):
    path = tmp_path / "zero7.json"
    path.write_text(json.dumps(with_(zero_optimization={"stage": 7})))
    refused(launch(ds_config=str(path)), f"--ds_config {path}: zero_optimization.stage is 7", tmp_path / "run")
