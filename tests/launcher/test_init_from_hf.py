"""Continued pretraining of a Pythia-layout checkpoint in its own (Hugging Face) tokenizer, end to end:
a tiny GPTNeoXForCausalLM + byte-level BPE directory made here with transformers -> preprocess with its tokenizer
-> the launcher (model.init_from_hf, 2 GrowLength stages, 1 rank) -> export -> transformers loads it, AutoTokenizer
gives our ids, and the logits match ours in fp32."""
import json
import os

import pytest

from launching import pretrain_args

TEXT = "The with statement is used to wrap the execution of a block\n\twith methods ünïcödé 🙂"


@pytest.fixture(scope="module")
def pythia_dir(tmp_path_factory, corpus_jsonl):
    """config.json + model.safetensors + tokenizer files, as save_pretrained lays out a Pythia checkpoint; the
    embedding is padded past the tokenizer (1024 rows for 1000 ids), as Pythia's 50304 for 50277."""
    transformers = pytest.importorskip("transformers")
    import torch
    from data_pipeline.train_tokenizer import train_bytelevel_bpe

    d = tmp_path_factory.mktemp("pythia") / "pythia-tiny"
    bpe = train_bytelevel_bpe([corpus_jsonl], str(d.parent / "bpe"), vocab_size=1000, quiet=True)
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(bpe).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def prefix(pythia_dir, corpus_jsonl, tmp_path_factory):
    """The corpus preprocessed with the checkpoint's own tokenizer (its directory)."""
    from data_pipeline.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    preprocess([corpus_jsonl], prefix, str(pythia_dir), workers=2, quiet=True)
    return prefix


@pytest.fixture(scope="module")
def trained(pythia_dir, prefix, tmp_path_factory, launch):
    """6 steps from the checkpoint's weights: 3 at L=32, 3 at L=64."""
    run_dir = tmp_path_factory.mktemp("continued") / "run"
    proc = launch(pretrain_args(run_dir, prefix, pythia_dir, f"model.init_from_hf={pythia_dir}",
                                "logging.eval_tokens=512", "growlength.tokens_per_step=256",
                                "growlength.stages=[{seq_len: 32, tokens: 768}, {seq_len: 64, tokens: 768}]"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_continue_pretraining_a_pythia_layout_checkpoint_and_export(pythia_dir, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    from data_pipeline.tokenizer import Tokenizer
    from evidence.export_hf import export, load_trained_model
    from launcher.metrics import read_metrics

    tok = Tokenizer(pythia_dir)  # the directory transformers wrote: eos from its tokenizer_config.json
    assert (tok.kind, tok.eod_id, tok.vocab_size) == ("huggingface", 0, 1000)
    steps = [r for r in read_metrics(trained) if "kind" not in r]
    assert [(r["step"], r["seq_len"]) for r in steps] == [(1, 32), (2, 32), (3, 32), (4, 64), (5, 64), (6, 64)]

    out = export(str(trained), str(tmp_path / "hf"))
    ours, state, _ = load_trained_model(trained)
    assert state.model["hidden_size"] == 64 and state.model["vocab_size"] == 1024  # the checkpoint's shape
    # started from the checkpoint's weights and trained from there: 6 AdamW steps at lr <= 1e-3 move no weight
    # by 0.02 (a fresh init at std 0.02 would differ from it by more in every matrix), and they did move
    before = load_file(str(pythia_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    drift = {k: (after[k] - before[k]).abs().max().item() for k in before}
    assert max(drift.values()) < 0.02 and drift["gpt_neox.embed_in.weight"] > 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPTNeoXForCausalLM" and hf.config.eos_token_id == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(TEXT)
    assert hf_tok(TEXT).input_ids == ids == transformers.AutoTokenizer.from_pretrained(pythia_dir)(TEXT).input_ids
    assert hf_tok.eos_token_id == 0 and Tokenizer(out).eod_id == 0
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert a.shape == b.shape == (1, len(ids), 1024)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_export_refuses_a_run_whose_tokenizer_is_gone(trained, tmp_path, caplog):
    """A moved run whose own tokenizer copy no longer opens: exit 2 with the path, and no --out written."""
    import shutil

    from launcher import checkpoint as ckpt
    from evidence import export_hf

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    found = ckpt.resolve_resume(str(run), str(run))
    copy = run / ckpt.read_state(found).tokenizer_in_run
    (copy / "tokenizer.json" if copy.is_dir() else copy).write_text("{not json")
    assert export_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "the tokenizer this run trained with does not open" in caplog.text
    assert str(run / "tokenizer") in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_init_from_hf_inputs_are_checked_before_anything_is_built(pythia_dir, prefix, tmp_path):
    import shutil

    from data_pipeline.errors import DatasetError
    from launcher.config import ConfigError, from_dict
    from launcher.data import prepare_data
    from launcher.modeling import run_model_config

    def prepare(hf_dir):
        cfg = from_dict({"run_dir": str(tmp_path / "run"), "model": {"init_from_hf": str(hf_dir)},
                         "data": {"prefix": prefix, "tokenizer": str(pythia_dir)}})
        data = prepare_data(cfg, rank=0, world=1)
        return run_model_config(cfg.model, data.tokenizer)

    assert prepare(pythia_dir).hidden_size == 64  # the checkpoint's config, not the preset's
    with pytest.raises(ConfigError, match=r"model\.init_from_hf .*nowhere: no config\.json there; give a Hugging "
                                          r"Face GPT-NeoX or Llama directory"):
        prepare(tmp_path / "nowhere")
    small = tmp_path / "small-vocab"
    shutil.copytree(pythia_dir, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    with pytest.raises(DatasetError, match=r"small-vocab has vocabulary 512 but the tokenizer .* has 1000: give the "
                                           r"checkpoint's own tokenizer as data\.tokenizer"):
        prepare(small)
    (small / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match=r"model\.init_from_hf .*small-vocab: "):
        prepare(small)


def test_init_from_hf_refuses_data_of_another_tokenizer(pythia_dir, tokenized, sp_model, tmp_path):
    """Sentencepiece data (1000 ids) fits the checkpoint's 1024 rows, but its ids mean other text than the
    checkpoint's own byte-level BPE: refused, naming both."""
    from data_pipeline.errors import DatasetError
    from launcher.config import from_dict
    from launcher.data import prepare_data
    from launcher.modeling import run_model_config

    cfg = from_dict({"run_dir": str(tmp_path / "run"), "model": {"init_from_hf": str(pythia_dir)},
                     "data": {"prefix": tokenized, "tokenizer": sp_model}})
    data = prepare_data(cfg, rank=0, world=1)
    with pytest.raises(DatasetError, match=r"model\.init_from_hf .*pythia-tiny was trained with its own tokenizer "
                                           r"\(tokenizer\.json\), not the run's .*tok\.model \(sentencepiece, "
                                           r"1,000 ids, EOD 2, .*preprocess the data with the checkpoint's tokenizer"):
        run_model_config(cfg.model, data.tokenizer)


def test_a_run_from_init_from_hf_resumes_once_the_hf_directory_is_gone(pythia_dir, prefix, tmp_path, launch):
    """The checkpoint holds the whole model: a resume reads neither the HF config nor its weights."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(pythia_dir, hf)
    run_dir = tmp_path / "run"
    args = pretrain_args(run_dir, prefix, pythia_dir, f"model.init_from_hf={hf}", "logging.eval_tokens=256",
                         "growlength.tokens_per_step=256", "checkpointing.interval_steps=2",
                         "growlength.stages=[{seq_len: 32, tokens: 1024}]")
    proc = launch(args, fault="kill@3")
    assert proc.returncode != 0 and (run_dir / "checkpoints" / "step_00000002").is_dir(), proc.stdout[-2000:]
    shutil.rmtree(hf)
    proc = launch(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step_00000002" in out
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()


def test_init_from_hf_names_a_config_without_hidden_size_and_a_truncated_safetensors(pythia_dir, tmp_path):
    import shutil

    from launcher.config import ConfigError, from_dict
    from launcher.modeling import build_model, run_model_config
    from data_pipeline.tokenizer import Tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(pythia_dir, broken)
    cfg = from_dict({"run_dir": str(tmp_path / "run"), "model": {"init_from_hf": str(broken)},
                     "data": {"prefix": "p", "tokenizer": str(pythia_dir)}})
    tok = Tokenizer(pythia_dir)
    good = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match=r"model\.init_from_hf .*broken: .*broken/config\.json: no 'hidden_size', "
                                          r"which a gpt_neox config must give; restore the complete config\.json"):
        run_model_config(cfg.model, tok)
    (broken / "config.json").write_text(json.dumps(good))
    model_config = run_model_config(cfg.model, tok)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"model\.init_from_hf: .*broken/model\.safetensors: cannot be read "
                                          r"\(.*\); the file is truncated or damaged: download or copy it again"):
        build_model(cfg, model_config)
