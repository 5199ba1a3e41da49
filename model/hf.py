"""Interchange with Hugging Face `GPTNeoXForCausalLM` and `LlamaForCausalLM`: export, and import to continue
pretraining Pythia, SmolLM2, TinyLlama, ...

transformers is imported lazily (an export and test dependency, not a training one). Inside a block our module
names equal HF's, so the weight mapping renames the top level:

    ours                       GPTNeoXForCausalLM             LlamaForCausalLM
    embed_in.weight            gpt_neox.embed_in.weight       model.embed_tokens.weight
    layers.{i}.*               gpt_neox.layers.{i}.*          model.layers.{i}.*
    final_layer_norm.*         gpt_neox.final_layer_norm.*    model.norm.weight
    embed_out.weight           embed_out.weight               lm_head.weight (absent when tied)

RoPE scaling on export: docs/model.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .model import CausalLM

log = logging.getLogger(__name__)

HF_MODEL_TYPES = {"gpt-neox": "gpt_neox", "llama": "llama"}
HF_ARCHITECTURES = {"gpt-neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
_LLAMA_TOP = {"embed_in.weight": "model.embed_tokens.weight", "final_layer_norm.weight": "model.norm.weight",
              "embed_out.weight": "lm_head.weight"}
_HF_LEFTOVERS = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (e.g. consolidated fp32 from a DeepSpeed checkpoint) -> the HF class's keys (GPT-NeoX when
    `config` is None). A tied LM head is written once, as the embedding, as save_pretrained does."""
    if config is None or config.family == "gpt-neox":
        return {key if key == "embed_out.weight" else "gpt_neox." + key: value for key, value in sd.items()}
    out = {}
    for key, value in sd.items():
        if key == "embed_out.weight" and config.tie_word_embeddings:
            continue
        out[_LLAMA_TOP.get(key, "model." + key)] = value
    return out


def hf_to_state_dict(hf_sd: dict[str, torch.Tensor], family: str = "gpt-neox") -> dict[str, torch.Tensor]:
    """The HF class's state dict -> ours. Drops HF's non-parameter leftovers (old attention.bias / masked_bias /
    rotary inv_freq buffers in some checkpoints); GPT-NeoX's head may be named embed_out or lm_head."""
    out = {}
    if family == "gpt-neox":
        for key, value in hf_sd.items():
            if key in ("embed_out.weight", "lm_head.weight"):
                out["embed_out.weight"] = value
            elif key.startswith("gpt_neox.") and not key.endswith(_HF_LEFTOVERS):
                out[key[len("gpt_neox."):]] = value
        return out
    ours = {hf: our for our, hf in _LLAMA_TOP.items()}
    for key, value in hf_sd.items():
        if key in ours:
            out[ours[key]] = value
        elif key.startswith("model.") and not key.endswith(_HF_LEFTOVERS):
            out[key[len("model."):]] = value
    return out


def _exported_rope(config: ModelConfig) -> tuple[float, dict]:
    """(rope_theta, rope_parameters) as transformers reads them; ntk is folded into rope_theta (module doc)."""
    rope_theta = config.rope_base
    if config.rope_scaling == "ntk":
        r = config.rotary_dim
        rope_theta = config.rope_base * config.rope_scaling_factor ** (r / (r - 2))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if config.rope_scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=config.rope_scaling_factor)
    return rope_theta, rope_parameters


def hf_config_dict(config: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = 3,
                   max_position_embeddings: int = 2048) -> dict:
    """config.json contents for the HF class of `config.family` (GPTNeoXForCausalLM or LlamaForCausalLM)
    equivalent to `config`."""
    rope_theta, rope_parameters = _exported_rope(config)
    common = {
        "architectures": [HF_ARCHITECTURES[config.family]],
        "model_type": HF_MODEL_TYPES[config.family],
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": config.effective_init_std,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if config.document_masking:  # how it was trained; read back by config_from_hf (transformers keeps the key)
        common["growlength"] = {"document_masking": True, "reset_position_ids": config.reset_position_ids}
    if config.family == "llama":
        return {**common,
                "num_key_value_heads": config.num_kv_heads,
                "head_dim": config.head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": config.layer_norm_eps,
                "rope_theta": rope_theta,
                "rope_scaling": rope_parameters if config.rope_scaling == "linear" else None,
                "rope_parameters": rope_parameters,
                "attention_bias": False,
                "mlp_bias": False,
                "pretraining_tp": 1}
    return {**common,
            "hidden_act": "gelu",
            "rotary_pct": config.rotary_pct,
            "rotary_emb_base": rope_theta,
            "rope_parameters": {**rope_parameters, "partial_rotary_factor": config.rotary_pct},
            "layer_norm_eps": config.layer_norm_eps,
            "use_parallel_residual": config.use_parallel_residual,
            "attention_bias": True,
            "hidden_dropout": 0.0}


def _hf_rope(hf: dict) -> tuple[str, float, dict]:
    """(our rope_scaling, its factor, the rope dict) from an HF config.json, in transformers' precedence
    (rope_scaling over rope_parameters)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope type {rope_type!r} in config.json is not supported: only default and linear")
    factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return ("linear" if rope_type == "linear" else "none"), factor, rope


def config_from_hf(hf: dict, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from an HF GPT-NeoX or Llama config.json dict. The HF embedding size is kept exactly (Pythia's
    50304 is already a multiple of 128; otherwise padding is disabled so the weights fit)."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES.values():
        raise ValueError(f"model_type={model_type!r}: only gpt_neox (Pythia) and llama checkpoints can be "
                         f"imported")
    scaling, factor, rope = _hf_rope(hf)
    V = hf["vocab_size"]
    trained = hf.get("growlength") or {}
    dims = dict(vocab_size=vocab_size or V, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                rope_scaling=scaling, rope_scaling_factor=factor, vocab_pad_multiple=128 if V % 128 == 0 else V,
                document_masking=bool(trained.get("document_masking", False)),
                reset_position_ids=bool(trained.get("reset_position_ids", False)))
    if model_type == "llama":
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias") \
                or head_dim * hf["num_attention_heads"] != hf["hidden_size"] \
                or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config.json differs from the Llama architecture this model implements (hidden_act "
                             "silu, no attention or MLP bias, head_dim = hidden_size / num_attention_heads, full "
                             "rotary are required)")
        return ModelConfig(family="llama", num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                           rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                           tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           layer_norm_eps=hf.get("rms_norm_eps", 1e-6), **dims)
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("attention_bias", True) \
            or hf.get("tie_word_embeddings", False):
        raise ValueError("config.json differs from Pythia's architecture (hidden_act gelu, attention_bias true, "
                         "untied embeddings are required)")
    return ModelConfig(family="gpt-neox", rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                       rope_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
                       use_parallel_residual=hf.get("use_parallel_residual", True),
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-5), **dims)


# ---------------------------------------------------------------- tokenizer
def _exportable_proto(sp_model_path: str | os.PathLike):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model_path).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        raise ValueError(f"{sp_model_path}: a sentencepiece {kind} model has no Hugging Face tokenizer.json that "
                         f"encodes to the same ids; only sentencepiece BPE models (train_tokenizer's default "
                         f"--model-type bpe) are exported")
    return proto


def check_exportable_tokenizer(sp_model_path: str | os.PathLike) -> None:
    """Raise ValueError (one line) for a sentencepiece model that `save_tokenizer` cannot convert: check it before
    any expensive work."""
    _exportable_proto(sp_model_path)


def sentencepiece_to_tokenizers(sp_model_path: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes text to the same ids as a sentencepiece BPE model (byte_fallback,
    no BOS/EOS added). Merges are ranked by piece score, which is how sentencepiece BPE chooses them; the
    normalizer replays sentencepiece's own (charsmap, whitespace cleanup, dummy prefix, space -> U+2581)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = _exportable_proto(sp_model_path)
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
def save_hf(model: CausalLM, out_dir: str | os.PathLike, tokenizer_model_path: str | os.PathLike | None = None,
            max_position_embeddings: int = 2048, dtype: torch.dtype = torch.float32) -> Path:
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as GPTNeoXForCausalLM or
    LlamaForCausalLM (by the model's family) with our logits: config.json, model.safetensors (in `dtype`, HF's key
    names), and with a sentencepiece model also the tokenizer files. `max_position_embeddings` is metadata for HF
    users (RoPE has no limit)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = dict(bos_id=1, eos_id=2, pad_id=3)  # the project's tokenizer conventions (data_pipeline)
    if tokenizer_model_path is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model_path))
        ids = dict(bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id() if sp.pad_id() >= 0 else None)
    config = hf_config_dict(model.config, max_position_embeddings=max_position_embeddings, **ids)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(model_card(model, config["architectures"][0]))
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict_to_hf(sd, model.config), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_model_path is not None:
        save_tokenizer(tokenizer_model_path, out, model_max_length=max_position_embeddings)
    log.info("saved Hugging Face %s directory %s", config["architectures"][0], out)
    return out


def model_card(model: CausalLM, architecture: str) -> str:
    """README.md of an export: what the model is and how its attention was trained (document masking)."""
    c = model.config
    if c.document_masking:
        how = ("**Trained with document masking**: inside each packed training window, attention never crossed an "
               "end-of-document token (each document attended only to its own earlier tokens)"
               + (", and RoPE positions restarted at 0 at each document (reset position ids)." if c.reset_position_ids
                  else "; positions were not reset (they run 0..seq_len-1 across the window).")
               + "\n\nHugging Face's forward does not apply that mask: give it one document per sequence (what the "
                 "model saw), or pass packed documents yourself with a block-causal mask.")
    else:
        how = ("Trained without document masking (as Pythia): attention ran over the whole packed window, across "
               "end-of-document tokens.")
    return (f"---\nlibrary_name: transformers\ntags: [growlength]\n---\n# {architecture} trained with growlength\n\n"
            f"{c.family} decoder, {c.num_layers} layers, hidden size {c.hidden_size}, {c.num_heads} heads "
            f"({c.num_kv_heads} key/value heads), vocabulary {c.padded_vocab_size}, {model.num_params() / 1e6:.2f}M "
            f"parameters; pretrained with a growing sequence length (GrowLength).\n\n{how}\n")


def read_hf_config(hf_dir: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of an HF GPT-NeoX or Llama directory (its config.json only: cheap). `overrides` are
    ModelConfig fields (e.g. attention, activation_checkpointing, rope_scaling for evaluation)."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}/config.json not found: pass a directory written by save_pretrained")
    path = d / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
        return dataclasses.replace(config_from_hf(hf), **overrides)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore it from the original checkpoint") from None
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}, which a {hf.get('model_type', 'GPT-NeoX or Llama')} config "
                         f"must give; restore the complete config.json of this checkpoint") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{path}: a field has the wrong type ({e}); restore the complete config.json of this "
                         f"checkpoint") from None


def load_hf_weights(model: CausalLM, hf_dir: str | os.PathLike) -> CausalLM:
    """Load the weights of an HF directory (model.safetensors or pytorch_model.bin, sharded or not) into `model`,
    built from that directory's read_hf_config."""
    sd = hf_to_state_dict(_read_hf_weights(Path(hf_dir)), model.config.family)
    model.load_weights(sd, f"{hf_dir} (config.json)")
    return model


def load_hf(hf_dir: str | os.PathLike, **overrides) -> CausalLM:
    """A GPT-NeoX / Pythia or Llama directory -> our model of that family in fp32 (see read_hf_config)."""
    return load_hf_weights(CausalLM(read_hf_config(hf_dir, **overrides)), hf_dir)


def _read_weights_file(path: Path, read) -> dict[str, torch.Tensor]:
    """`read(str(path))`, a truncated or damaged file raised as one ValueError line naming it."""
    try:
        return read(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, torch.load several kinds
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {reason}); the file is truncated or "
                         f"damaged: download or copy it again") from None


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v.float() for f in files for k, v in _read_weights_file(f, load_file).items()}
    files = sorted(d.glob("pytorch_model*.bin"))
    if files:
        return {k: v.float() for f in files
                for k, v in _read_weights_file(f, lambda p: torch.load(p, map_location="cpu", weights_only=True)).items()}
    raise FileNotFoundError(f"{d}: no *.safetensors or pytorch_model*.bin weights found")
