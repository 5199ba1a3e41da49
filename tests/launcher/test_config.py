"""Run config and ds_config: defaults, overrides, every refusal names the key and the fix."""
import json
from pathlib import Path

import pytest

from launcher.config import ConfigError, describe_fields, load_config, parse_overrides
from launcher.ds_config import DSConfigError, fill_ds_config, load_ds_config, warmup_steps
from launcher.plan import build_plan


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("run_dir: runs/x\ngrowlength:\n  tokens_per_step: 8192\n  total_tokens: 81920\n"
                 "model:\n  preset: pythia-160m\n")
    cfg = load_config(str(f), ["growlength.tokens_per_step=16384", "logging.eval_lengths=[512, 1024]",
                               "model.num_layers=2"])
    assert cfg.run_dir == "runs/x"
    assert cfg.growlength.tokens_per_step == 16384
    assert cfg.growlength.total_tokens == 81920  # from the file, untouched by the override of a sibling
    assert cfg.model.preset == "pythia-160m" and cfg.model.model_settings() == {"num_layers": 2}
    assert cfg.logging.eval_lengths == [512, 1024]
    assert cfg.checkpointing.resume == "auto"


def test_unknown_keys_listed_together(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("bogus: 1\ngrowlength:\n  tokens_per_stepp: 1\nlogging:\n  verbose: true\n")
    with pytest.raises(ConfigError, match=r"unknown config keys \['bogus', 'growlength.tokens_per_stepp', "
                                          r"'logging.verbose'\]; see the valid ones with: python -m launcher.config"):
        load_config(str(f))


@pytest.mark.parametrize("override, message", [
    ("data.valid_fraction=1.5", r"data.valid_fraction must be in \[0, 1\), got 1.5"),
    ("data.epochs=forever", "data.epochs must be 'repeat' or 'error', got 'forever'"),
    ("data.prefix=/x", "data.prefix and data.tokenizer go together"),
    ("growlength.stages=[]", "growlength.stages must be a non-empty list"),
    ("growlength.stages=[{seq_len: 64}]", r"stages\[0\] must give exactly one budget"),
    ("growlength.stages=[{seq_len: 64, tokens: 8, share: 1}]", r"exactly one budget .* got \['tokens', 'share'\]"),
    ("growlength.stages=[{seq_len: 64, tokens: 8}, {seq_len: 128, share: 1}]", "mix budget kinds"),
    ("growlength.stages=[{seq_len: 64, share: 1, foo: 2}]", r"stages\[0\] has unknown keys \['foo'\]"),
    ("growlength.total_tokens=null", "give share but growlength.total_tokens is not set"),
    ("growlength.grad_accum=0", "growlength.grad_accum must be >= 1 or null"),
    ("checkpointing.keep_last=0", "checkpointing.keep_last must be >= 1"),
    ("checkpointing.interval_steps=-1", "checkpointing.interval_steps must be >= 0"),
    ("logging.log_interval=0", "logging.log_interval must be >= 1"),
    ("optimisation.warmup_fraction=1", r"optimisation.warmup_fraction must be in \[0, 1\)"),
    ("growlength", "is not key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file; presets are in"):
        load_config("nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("growlength: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(f))
    f.write_text("growlength: 3\n")
    with pytest.raises(ConfigError, match="section growlength must be a mapping"):
        load_config(str(f))


def test_parse_overrides_types():
    assert parse_overrides(["a.b=3", "a.c=null", "d=[1, 2]", "e=text"]) == {"a": {"b": 3, "c": None}, "d": [1, 2],
                                                                           "e": "text"}


def test_describe_fields_lists_every_section():
    text = describe_fields()
    for section in ("data:", "model:", "growlength:", "optimisation:", "checkpointing:", "logging:"):
        assert section in text
    assert "tokens_per_step: 4096  # global tokens per optimizer step" in text


ROOT = Path(__file__).resolve().parents[2]
PLAN = build_plan([64, 128], [6, 4], tokens_per_step=1024, world_size=2, grad_accum=2)


def test_ds_config_filled_from_plan():
    src = json.load(open(ROOT / "ds_configs/zero2.json"))
    out = fill_ds_config(src, PLAN, warmup=warmup_steps(PLAN.total_steps, None, 0.1))
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 16
    assert out["scheduler"]["params"]["total_num_steps"] == 10
    assert out["scheduler"]["params"]["warmup_num_steps"] == 1
    assert "train_batch_size" not in src  # the user's dict is not modified


def test_ds_config_contradictions_named():
    src = {"train_batch_size": 32, "gradient_accumulation_steps": "auto",
           "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 99}}}
    with pytest.raises(DSConfigError) as e:
        fill_ds_config(src, PLAN, warmup=1, source="my.json")
    msg = str(e.value)
    assert "my.json: train_batch_size is 32 but the GrowLength plan needs 16" in msg
    assert "my.json: scheduler.params.total_num_steps is 99 but the GrowLength plan needs 10" in msg
    assert "gradient_accumulation_steps" not in msg  # "auto" is fine
    with pytest.raises(DSConfigError, match="fp16.enabled and bf16.enabled are both true"):
        fill_ds_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, PLAN, warmup=1)


def test_ds_config_files(tmp_path):
    with pytest.raises(DSConfigError, match="--ds_config nope.json: no such file"):
        load_ds_config("nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"bf16\": }")
    with pytest.raises(DSConfigError, match="is not valid JSON"):
        load_ds_config(str(bad))
    bad.write_text("[1]")
    with pytest.raises(DSConfigError, match="must hold a JSON object"):
        load_ds_config(str(bad))
    for name in ("zero1", "zero2", "zero2_offload"):
        cfg = load_ds_config(str(ROOT / f"ds_configs/{name}.json"))
        # torch's AdamW on the GPU; DeepSpeed's CPU Adam where the optimizer is offloaded (test_ds_configs.py)
        assert cfg["optimizer"]["params"].get("torch_adam", False) is (name != "zero2_offload")


def test_micro_batch_probe_needs_free_accumulation():
    with pytest.raises(ConfigError, match="micro_batch_probe chooses the accumulation per stage: set "
                                          "growlength.grad_accum: null"):
        load_config(None, ["growlength.micro_batch_probe=probe.json"])
    assert load_config(None, ["growlength.micro_batch_probe=p.json", "growlength.grad_accum=null"]).growlength.grad_accum is None


# ---- the model section validates into the model's own config ----------------------------------------------------
# a valid value other than the preset's for every ModelConfig field, with the preset it fits
MODEL_VALUES = {
    "hidden_size": ("tiny", 32), "num_layers": ("tiny", 3), "num_heads": ("tiny", 2),
    "family": ("tiny-llama", "llama"), "num_kv_heads": ("tiny-llama", 1), "intermediate_size": ("tiny", 100),
    "rotary_pct": ("tiny", 0.5), "rope_base": ("pythia-70m", 500.0), "rope_scaling": ("tiny", "linear"),
    "rope_scaling_factor": ("tiny", 2.0), "use_parallel_residual": ("tiny", False),
    "tie_word_embeddings": ("tiny-llama", False), "layer_norm_eps": ("tiny", 0.001), "attention": ("tiny", "sdpa"),
    "activation_checkpointing": ("tiny", True), "document_masking": ("tiny", True),
    "reset_position_ids": ("tiny", True), "init_std": ("tiny", 0.01), "output_init_std": ("tiny", 0.003),
    "vocab_pad_multiple": ("tiny", 64), "deterministic_attention": ("tiny", True),
    "z_loss": ("tiny", 1e-4),
}


def model_config(*overrides):
    from types import SimpleNamespace

    from launcher.modeling import model_config_for
    cfg = load_config(None, list(overrides))
    return model_config_for(cfg.model, SimpleNamespace(vocab_size=300, path="tok.model"))


def test_every_model_field_is_set_from_the_run_config():
    import dataclasses

    from model import ModelConfig
    assert set(MODEL_VALUES) == {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    for name, (preset, value) in MODEL_VALUES.items():
        extra = ["model.document_masking=true"] if name == "reset_position_ids" else []
        config = model_config(f"model.preset={preset}", f"model.{name}={json.dumps(value)}", *extra)
        default = ModelConfig.from_preset(preset, vocab_size=300)
        assert getattr(config, name) == value, name
        assert value != getattr(default, name) or name == "family", name  # a preset implies its family
        assert config.vocab_size == 300
    with pytest.raises(ValueError, match=r"family='gpt-neox' disagrees with preset 'tiny-llama'"):
        model_config("model.preset=tiny-llama", "model.family=gpt-neox")


def test_presets_keep_working_with_field_overrides():
    from model import ModelConfig
    config = model_config("model.preset=pythia-70m", "model.num_layers=2", "model.attention=sdpa")
    assert config == ModelConfig.from_preset("pythia-70m", vocab_size=300, num_layers=2, attention="sdpa")
    assert (config.hidden_size, config.num_heads, config.rotary_pct) == (512, 8, 0.25)
    assert model_config("model.preset=smollm2-135m").rope_base == 100000.0  # null keeps the preset's value
    with pytest.raises(ValueError, match=r"num_kv_heads=3 does not divide num_heads=4"):  # the model's own rules
        model_config("model.preset=tiny-llama", "model.num_kv_heads=3")


def test_every_model_field_is_checked_and_a_wrong_type_names_it():
    import dataclasses

    from model import ModelConfig
    for f in dataclasses.fields(ModelConfig):
        if f.name == "vocab_size":
            with pytest.raises(ConfigError, match=r"unknown config keys \['model.vocab_size'\].*\(valid model: "
                                                  r"preset, compile, init_from_hf, hidden_size, num_layers, "):
                load_config(None, ["model.vocab_size=5"])  # the tokenizer's, never the config's
            continue
        with pytest.raises(ConfigError, match=rf"^model\.{f.name} must be .*, got \[1\]$"):
            load_config(None, [f"model.{f.name}=[1]"])
        meta = f.metadata
        bad = ("nonsense" if "choices" in meta else meta.get("ge", meta.get("gt", 0)) - 1 if "le" not in meta
               else meta["le"] + 1)
        if any(k in meta for k in ("choices", "ge", "gt", "le")):
            with pytest.raises(ConfigError, match=rf"^model\.{f.name} must be .*, got {bad!r}$"):
                load_config(None, [f"model.{f.name}={json.dumps(bad)}"])


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("growlength:\n  tokens_per_step: 8192\nrun_dir: runs/x\n"
                 "growlength:\n  tokens_per_step: 16384\n")
    with pytest.raises(ConfigError, match=rf"--config {f}: key 'growlength' is given twice \(lines 1 and 4\); "
                                          "keep one of them"):
        load_config(str(f))
    f.write_text("model:\n  num_layers: 2\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match=r"key 'num_layers' is given twice \(lines 2 and 3\)"):
        load_config(str(f))


def test_exponent_floats_read_as_numbers(tmp_path):
    """PyYAML's YAML 1.1 rules read ``1e-6`` as a string; the run config reads it as YAML 1.2 does."""
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  layer_norm_eps: 1e-6\n")
    assert load_config(str(f)).model.layer_norm_eps == 1e-6
    assert parse_overrides(["optim.lr=3e-4", "x=a1e5"]) == {"optim": {"lr": 3e-4}, "x": "a1e5"}
