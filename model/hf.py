"""Interchange with Hugging Face `GPTNeoXForCausalLM` (export for users, import to continue pretraining Pythia).

transformers is imported lazily inside the functions that need it: it is an export/test dependency, not a
training one. Our module names equal HF's, so the weight mapping is a prefix rename:

    ours                       HF
    embed_in.weight            gpt_neox.embed_in.weight
    layers.{i}.*               gpt_neox.layers.{i}.*
    final_layer_norm.*         gpt_neox.final_layer_norm.*
    embed_out.weight           embed_out.weight
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .model import GPTNeoX

log = logging.getLogger(__name__)

_HF_HEAD = "embed_out.weight"


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (e.g. consolidated fp32 from a DeepSpeed checkpoint) -> GPTNeoXForCausalLM's keys.
    `config` is accepted for symmetry and future layout changes; the mapping does not need it today."""
    out = {}
    for key, value in sd.items():
        out[key if key == "embed_out.weight" else "gpt_neox." + key] = value
    return out


def hf_to_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM's state dict -> ours. Drops HF's non-parameter leftovers (old attention.bias /
    masked_bias / rotary inv_freq buffers in some Pythia checkpoints) and accepts the head as embed_out or lm_head."""
    out = {}
    for key, value in hf_sd.items():
        if key in ("embed_out.weight", "lm_head.weight"):
            out["embed_out.weight"] = value
        elif key.startswith("gpt_neox."):
            k = key[len("gpt_neox."):]
            if k.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")):
                continue
            out[k] = value
    return out


def hf_config_dict(config: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = 3,
                   max_position_embeddings: int = 2048) -> dict:
    """config.json contents for GPTNeoXForCausalLM equivalent to `config`.

    rope_scaling: 'linear' maps to HF's linear rope type; 'ntk' (static NTK-aware) has no HF type, but it is
    exactly a larger rope_theta, so it is exported as that."""
    rope_theta = config.rope_base
    if config.rope_scaling == "ntk":
        r = config.rotary_dim
        rope_theta = config.rope_base * config.rope_scaling_factor ** (r / (r - 2))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": config.rotary_pct}
    if config.rope_scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=config.rope_scaling_factor)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": rope_theta,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": config.effective_init_std,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.use_parallel_residual,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def config_from_hf(hf: dict, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from an HF GPT-NeoX config.json dict. The HF embedding size is kept exactly (Pythia's 50304
    is already a multiple of 128; otherwise padding is disabled so the weights fit)."""
    if hf.get("model_type") != "gpt_neox":
        raise ValueError(f"model_type={hf.get('model_type')!r}: only gpt_neox (Pythia) checkpoints can be imported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported: only default and linear")
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("attention_bias", True) \
            or hf.get("tie_word_embeddings", False):
        raise ValueError("config.json differs from Pythia's architecture (hidden_act gelu, attention_bias true, "
                         "untied embeddings are required)")
    V = hf["vocab_size"]
    return ModelConfig(
        vocab_size=vocab_size or V,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
        rope_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
        rope_scaling="linear" if rope_type == "linear" else "none",
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        use_parallel_residual=hf.get("use_parallel_residual", True),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        vocab_pad_multiple=128 if V % 128 == 0 else V,
    )


# ---------------------------------------------------------------- tokenizer
def sentencepiece_to_tokenizers(sp_model_path: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes text to the same ids as a sentencepiece BPE model (byte_fallback,
    no BOS/EOS added). Merges are ranked by piece score, which is how sentencepiece BPE chooses them; the
    normalizer replays sentencepiece's own (charsmap, whitespace cleanup, dummy prefix, space -> U+2581)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model_path).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{sp_model_path}: only sentencepiece BPE models can be exported (model_type bpe)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    merges = []
    for piece_id, p in enumerate(proto.pieces):  # ids of learned pieces are in descending score order
        if p.type != normal or len(p.piece) < 2:
            continue
        splits = [(p.piece[:i], p.piece[i:]) for i in range(1, len(p.piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [(piece_id, vocab[a], vocab[b], a, b) for a, b in splits]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback, dropout=None))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    specials = {}
    for name, piece_id in (("unk_token", proto.trainer_spec.unk_id), ("bos_token", proto.trainer_spec.bos_id),
                           ("eos_token", proto.trainer_spec.eos_id), ("pad_token", proto.trainer_spec.pad_id)):
        if piece_id >= 0:
            specials[name] = proto.pieces[piece_id].piece
    return tok, specials


def save_tokenizer(sp_model_path: str | os.PathLike, out_dir: str | os.PathLike, model_max_length: int = 2048):
    """Write tokenizer.json + tokenizer_config.json (+ a copy of tokenizer.model) for AutoTokenizer."""
    tok, specials = sentencepiece_to_tokenizers(sp_model_path)
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer.model").write_bytes(Path(sp_model_path).read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# ---------------------------------------------------------------- model directories
def save_hf(model: GPTNeoX, out_dir: str | os.PathLike, tokenizer_model_path: str | os.PathLike | None = None,
            max_position_embeddings: int = 2048) -> Path:
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as GPTNeoXForCausalLM
    with our logits: config.json, model.safetensors (fp32, Pythia's key names), and with a sentencepiece
    model also the tokenizer files. `max_position_embeddings` is metadata for HF users (RoPE has no limit)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = dict(bos_id=1, eos_id=2, pad_id=3)  # the project's tokenizer conventions (data_pipeline)
    if tokenizer_model_path is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model_path))
        ids = dict(bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id() if sp.pad_id() >= 0 else None)
    config = hf_config_dict(model.config, max_position_embeddings=max_position_embeddings, **ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict_to_hf(sd, model.config), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_model_path is not None:
        save_tokenizer(tokenizer_model_path, out, model_max_length=max_position_embeddings)
    log.info("saved Hugging Face GPTNeoXForCausalLM directory %s", out)
    return out


def load_hf(hf_dir: str | os.PathLike, **overrides) -> GPTNeoX:
    """A GPT-NeoX / Pythia directory (config.json + model.safetensors or pytorch_model.bin, sharded or not)
    -> our GPTNeoX in fp32. `overrides` are ModelConfig fields (e.g. attention, activation_checkpointing,
    rope_scaling for evaluation)."""
    import dataclasses

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}/config.json not found: pass a directory written by save_pretrained")
    hf_config = json.loads((d / "config.json").read_text())
    config = dataclasses.replace(config_from_hf(hf_config), **overrides)
    model = GPTNeoX(config)
    missing, unexpected = model.load_state_dict(hf_to_state_dict(_read_hf_weights(d)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: weights do not match a GPT-NeoX model of this config.json: "
                         f"missing {missing}, unexpected {unexpected}")
    return model


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v.float() for f in files for k, v in load_file(str(f)).items()}
    files = sorted(d.glob("pytorch_model*.bin"))
    if files:
        return {k: v.float() for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{d}: no *.safetensors or pytorch_model*.bin weights found")
