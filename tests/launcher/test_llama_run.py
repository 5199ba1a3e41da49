"""The launcher with model.family llama on 1 rank, in this process (real DeepSpeed engine on gloo): a 2-stage
GrowLength run of tiny-llama, export to LlamaForCausalLM, evaluate / bench_lengths on it, init_from_hf from a
Llama directory, and the refusals of a family that disagrees."""
import json

import pytest
import torch

from launcher.metrics import read_metrics

from launching import pretrain_args, run_in_process

transformers = pytest.importorskip("transformers")

PLAN = ["growlength.tokens_per_step=512",
        "growlength.stages=[{seq_len: 32, tokens: 2048}, {seq_len: 64, tokens: 2048}]"]


def args(run_dir, tokenized, sp_model, *extra):
    return pretrain_args(run_dir, tokenized, sp_model, "checkpointing.interval_steps=0", "logging.eval_tokens=1024",
                         *PLAN, *extra)


def in_process(run_dir, tokenized, sp_model, *extra):
    """pretrain.main in this process as rank 0 of 1: its exit code."""
    return run_in_process(args(run_dir, tokenized, sp_model, *extra))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenized, sp_model):
    run_dir = tmp_path_factory.mktemp("llama") / "run"
    assert in_process(run_dir, tokenized, sp_model, "model.preset=tiny-llama") == 0
    return run_dir


def test_tiny_llama_trains_through_two_stages(llama_run):
    from launcher import checkpoint as ckpt

    steps = [r for r in read_metrics(llama_run) if "kind" not in r]
    assert [(r["seq_len"], r["micro_batch_size"]) for r in steps] == [(32, 16)] * 4 + [(64, 8)] * 4
    assert steps[-1]["loss"] < steps[0]["loss"]
    state = ckpt.read_state(ckpt.resolve_resume("auto", llama_run))
    assert (state.model["family"], state.model["num_kv_heads"], state.model["tie_word_embeddings"]) == \
        ("llama", 2, True)
    assert state.step == 8


def test_export_gives_a_llama_that_transformers_loads_with_our_logits(llama_run, tmp_path, sp_model):
    from data_pipeline.tokenizer import Tokenizer
    from evidence import evaluate
    from evidence.export_hf import export, load_trained_model

    out = export(str(llama_run), str(tmp_path / "hf"))
    ours, _, _ = load_trained_model(llama_run)
    assert ours.embed_out.weight is ours.embed_in.weight  # still one tensor after loading the consolidated ZeRO state
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    text = "The with statement is used to wrap the execution of a block with methods defined by a context manager"
    ids = transformers.AutoTokenizer.from_pretrained(out)(text).input_ids
    assert ids == Tokenizer(sp_model).encode(text)
    x = torch.tensor([ids * 8])[:, :160]  # 160 tokens: past the longest stage (64)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    prompt = x[:, :6]
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=3,
                           eos_token_id=None)
    assert torch.equal(ours.generate(prompt, max_new_tokens=8), expected)
    # evaluate reads the run (ZeRO shards) and the exported Llama directory to the same perplexity
    same = dict(lengths=[32, 128], split="all", tokens=1024)
    run_report = evaluate.evaluate(str(llama_run), **same)
    hf_report = evaluate.evaluate(str(out), data_prefix=run_report["data_prefix"], **same)
    for r, h in zip(run_report["results"], hf_report["results"]):
        assert r["seq_len"] == h["seq_len"] and r["loss"] == pytest.approx(h["loss"], rel=1e-5)


def test_bench_lengths_measures_a_llama_preset():
    from evidence import bench_lengths

    rounds = bench_lengths.time_lengths("tiny-llama", vocab_size=1000, lengths=[32, 64], tokens_per_batch=128,
                                        dtype="fp32", steps=1, repeats=1)
    assert sorted(rounds[0]) == [32, 64] and all(t > 0 for ts in rounds[0].values() for t in ts)
    m = bench_lengths.measure_memory("tiny-llama", vocab_size=1000, seq_len=32, micro_batch=2, dtype="fp32")
    assert (m["seq_len"], m["micro_batch"]) == (32, 2)  # (CPU peak memory is meaningful in a fresh process only)


def prepared(tmp_path, tokenized, sp_model, **model):
    """(config, ModelConfig) of a 1-rank run with these model.* settings, as the launcher resolves them before it
    builds anything (no distributed work: data.prefix is given)."""
    from launcher.config import load_config
    from launcher.data import prepare_data
    from launcher.modeling import run_model_config

    overrides = [f"run_dir={tmp_path}/run", f"data.prefix={tokenized}", f"data.tokenizer={sp_model}", *PLAN]
    overrides += [f"model.{k}={json.dumps(v)}" for k, v in model.items()]
    cfg = load_config(None, overrides)
    return cfg, run_model_config(cfg.model, prepare_data(cfg, rank=0, world=1).tokenizer)


def test_init_from_hf_takes_a_llama_directory(tmp_path, tokenized, sp_model):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, intermediate_size=96, rope_theta=20000.0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    run_cfg, c = prepared(tmp_path, tokenized, sp_model, init_from_hf=str(tmp_path / "hf"), preset="tiny",
                          activation_checkpointing=True)
    from launcher.modeling import build_model
    # c: the directory's architecture, not the preset's; the launcher's own settings kept
    assert (c.family, c.num_kv_heads, c.intermediate_size, c.rope_base, c.activation_checkpointing) == \
        ("llama", 1, 96, 20000.0, True)
    model = build_model(run_cfg, c).eval()
    x = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, rtol=1e-4, atol=1e-5)


def test_model_family_that_disagrees_is_refused_before_training(tmp_path, tokenized, sp_model, capsys):
    code = in_process(tmp_path / "run", tokenized, sp_model, "model.preset=tiny-llama", "model.family=gpt-neox")
    assert code == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    out = capsys.readouterr()
    assert "model section: family='gpt-neox' disagrees with preset 'tiny-llama', a llama model" in out.out + out.err


@pytest.mark.parametrize("model, match", [
    (dict(family="gpt-neox"), r"model.family=gpt-neox but model.init_from_hf .* holds a llama model: drop "
                              r"model.family"),
    (dict(rope_base=5.0), r"the architecture comes from its config.json; drop model.rope_base"),
])
def test_init_from_hf_settings_that_cannot_apply_are_refused(tmp_path, tokenized, sp_model, model, match):
    from launcher.config import ConfigError
    from model import CausalLM, ModelConfig
    from model.hf import save_hf

    save_hf(CausalLM(ModelConfig.from_preset("tiny-llama", vocab_size=1000)), tmp_path / "hf")
    with pytest.raises(ConfigError, match=match):
        prepared(tmp_path, tokenized, sp_model, init_from_hf=str(tmp_path / "hf"), **model)


def test_resuming_a_tied_llama_at_the_stage_boundary_gives_the_same_losses(llama_run, launch, tmp_path, tokenized,
                                                                           sp_model):
    """In a subprocess: DeepSpeed keeps process-group state that a second engine in this process cannot reuse."""
    from launcher import checkpoint as ckpt

    boundary = ckpt.resolve_resume("auto", llama_run).parent / ckpt.tag_for(4)
    run_dir = tmp_path / "resumed"
    proc = launch(args(run_dir, tokenized, sp_model, "model.preset=tiny-llama", f"checkpointing.resume={boundary}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = {r["step"]: r["loss"] for r in read_metrics(llama_run) if "kind" not in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "kind" not in r}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
