"""ModelConfig: the knobs of both decoder families (GPT-NeoX / Pythia and Llama), presets, and their validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

FAMILIES = ("gpt-neox", "llama")
ROPE_SCALINGS = ("none", "linear", "ntk")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa")

# A preset implies its family. Pythia's published dimensions (Biderman et al. 2023, Table 1; EleutherAI/pythia
# configs/*.yml): rotary_pct 0.25, rope_base 10000, parallel residual, LayerNorm eps 1e-5, intermediate = 4 * d.
# The Llama presets copy the shapes of the published Hugging Face config.json files (HuggingFaceTB/SmolLM2-135M,
# HuggingFaceTB/SmolLM2-360M, TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T): full rotary, RMSNorm eps 1e-5,
# SwiGLU, grouped-query attention, no biases; SmolLM2 ties its embeddings, TinyLlama does not.
PRESETS: dict[str, dict] = {
    "tiny": dict(family="gpt-neox", hidden_size=64, num_layers=2, num_heads=4),
    # narrow enough that attention, not the LM head, decides how a CPU step's cost grows with length (docs/results)
    "narrow-4x128": dict(family="gpt-neox", hidden_size=128, num_layers=4, num_heads=4),
    "pythia-70m": dict(family="gpt-neox", hidden_size=512, num_layers=6, num_heads=8),
    "pythia-160m": dict(family="gpt-neox", hidden_size=768, num_layers=12, num_heads=12),
    "pythia-410m": dict(family="gpt-neox", hidden_size=1024, num_layers=24, num_heads=16),
    "pythia-1b": dict(family="gpt-neox", hidden_size=2048, num_layers=16, num_heads=8),
    "tiny-llama": dict(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=176, tie_word_embeddings=True),
    "smollm2-135m": dict(family="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rope_base=100000.0, tie_word_embeddings=True),
    "smollm2-360m": dict(family="llama", hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5,
                         intermediate_size=2560, rope_base=100000.0, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(family="llama", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                           intermediate_size=5632, rope_base=10000.0),
}


def _swiglu_width(d: int, multiple_of: int = 256) -> int:
    """Meta's Llama rule: 2/3 of 4d (a SwiGLU MLP has three matrices, so this keeps 4d's parameter count),
    rounded up to a multiple of 256; 1536, 2560, 5632 for d = 576, 960, 2048."""
    width = 8 * d // 3
    return -(-width // multiple_of) * multiple_of


def bound_problems(config) -> list[str]:
    """The fields of a dataclass outside the bounds their `knob` declares (None, a family default, is skipped);
    the run config checks types too, before a ModelConfig is built."""
    problems = []
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or not meta:
            continue
        if "choices" in meta:
            if value not in meta["choices"]:
                problems.append(f"{f.name}={value!r}: choose one of {', '.join(meta['choices'])}")
            continue
        if not any(k in meta for k in ("ge", "gt", "le", "lt")):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                f.type.startswith("int") and not isinstance(value, int)):
            problems.append(f"{f.name}={value!r}: must be {'an integer' if f.type.startswith('int') else 'a number'}")
        elif (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
              or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"])):
            problems.append(f"{f.name}={value!r}: must be {_bounds_text(meta)}")
    return problems


def _bounds_text(meta) -> str:
    """`in (0, 1]`, `>= 1`, `> 0`."""
    lo = f"[{meta['ge']}" if "ge" in meta else f"({meta['gt']}" if "gt" in meta else None
    hi = f"{meta['le']}]" if "le" in meta else f"{meta['lt']})" if "lt" in meta else None
    if lo and hi:
        return f"in {lo}, {hi}"
    return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}" if lo else f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"


def knob(help_text: str, default=dataclasses.MISSING, **bounds) -> dataclasses.Field:
    """A ModelConfig field with its one-line help and its bounds (`ge`, `gt`, `le`, `lt`, `choices`), declared once:
    ModelConfig checks the bounds (`bound_problems`), and the run config's `model:` section (launcher/config.py)
    checks each value's type and bounds and shows the help."""
    return dataclasses.field(default=default, metadata={"help": help_text, **bounds})


@dataclass
class ModelConfig:
    """Architecture of a RoPE decoder of either family. There is no block size: any sequence length runs.
    Fields left None take the family's default (see each field)."""

    vocab_size: int = knob("tokenizer vocabulary size (kept for export); the embedding has padded_vocab_size rows",
                           ge=1)
    hidden_size: int = knob("width d of the residual stream", ge=1)
    num_layers: int = knob("number of transformer blocks", ge=1)
    num_heads: int = knob("query heads; head_dim = hidden_size / num_heads", ge=1)
    family: str = knob("gpt-neox (Pythia: LayerNorm, GELU MLP, biases, partial rotary) or llama (RMSNorm, SwiGLU, "
                       "no biases, GQA); a preset implies its family", "gpt-neox", choices=FAMILIES)
    num_kv_heads: int | None = knob("key/value heads (grouped-query attention, llama only); null = num_heads", None,
                                    ge=1)
    intermediate_size: int | None = knob("MLP inner width; null = 4d (gpt-neox) or 8d/3 rounded up to a multiple of "
                                         "256 (llama, Meta's rule)", None, ge=1)
    rotary_pct: float | None = knob("share of each head's dims that are rotated; null = 0.25 (gpt-neox, Pythia) or "
                                    "1.0 (llama)", None, gt=0, le=1)
    rope_base: float = knob("RoPE base theta (Hugging Face: rope_theta)", 10000.0, gt=0)
    rope_scaling: str = knob("position scaling for evaluation beyond the trained length: none, linear "
                             "(interpolation) or ntk", "none", choices=ROPE_SCALINGS)
    rope_scaling_factor: float = knob("factor of rope_scaling: positions / factor (linear) or base * "
                                      "factor^(r/(r-2)) (ntk)", 1.0, ge=1)
    use_parallel_residual: bool | None = knob("x + attn(ln1(x)) + mlp(ln2(x)) instead of attention then MLP; "
                                              "null = true (gpt-neox), false (llama)", None)
    tie_word_embeddings: bool = knob("the LM head shares the input embedding's weight (llama only, e.g. SmolLM2; "
                                     "Pythia's are untied)", False)
    layer_norm_eps: float = knob("epsilon of the norms (LayerNorm for gpt-neox, RMSNorm for llama)", 1e-5, gt=0)
    attention: str = knob("attention backend: auto (flash-attn on CUDA fp16/bf16 sm80+ when installed, SDPA on Hopper "
                          "without documents, else torch's kernels; docs/gpu.md), flash or sdpa; how the run executes: "
                          "a checkpoint loads with any", "auto", choices=ATTENTION_BACKENDS)
    deterministic_attention: bool = knob("attention backward with a fixed summation order (flash-attn "
                                         "deterministic=True; SDPA without cuDNN or memory-efficient kernels), so a "
                                         "bf16 resume on a GPU repeats the same bits; slower backward", False)
    activation_checkpointing: bool = knob("recompute each block's activations in backward (saves memory on long "
                                          "stages)", False)
    document_masking: bool = knob("attention never crosses an EOD inside a window; the launcher, validation and "
                                  "evidence.evaluate pass each batch's document boundaries (forward's cu_seqlens); "
                                  "false as in Pythia", False)
    reset_position_ids: bool = knob("RoPE positions restart at 0 at each document start (needs document_masking)",
                                    False)
    init_std: float | None = knob("std of the normal init of embeddings, input projections and the LM head; null = "
                                  "sqrt(2/(5d)) (Pythia's small_init) for gpt-neox, 0.02 for llama", None, gt=0)
    output_init_std: float | None = knob("std of the two projections that write into the residual stream; null = "
                                         "2/(L*sqrt(d)) (Pythia's wang_init) for gpt-neox, 0.02/sqrt(2L) for llama",
                                         None, gt=0)
    z_loss: float = knob("weight of the log-partition penalty z_loss * mean(logsumexp(logits)^2) added to the "
                         "training loss (PaLM, OLMo use 1e-4); 0 = off; validation reports plain cross-entropy", 0.0,
                         ge=0)
    vocab_pad_multiple: int = knob("the embedding and LM head are padded to a multiple of this (speed); 1 disables "
                                   "padding", 128, ge=1)

    def __post_init__(self):
        problems = bound_problems(self)
        if problems:  # later checks divide by these
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(problems))
        llama = self.family == "llama"
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.rotary_pct is None:
            self.rotary_pct = 1.0 if llama else 0.25
        if self.use_parallel_residual is None:
            self.use_parallel_residual = not llama
        if self.intermediate_size is None:
            self.intermediate_size = _swiglu_width(self.hidden_size) if llama else 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                            f"choose num_heads dividing hidden_size")
        elif self.rotary_dim < 2 or self.rotary_dim % 2:
            problems.append(
                f"rotary dims = int(head_dim {self.head_dim} * rotary_pct {self.rotary_pct}) = {self.rotary_dim}: "
                f"RoPE rotates pairs, so this must be even and >= 2; change rotary_pct or hidden_size/num_heads "
                f"so that head_dim * rotary_pct is an even integer")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}: each "
                            f"key/value head serves num_heads / num_kv_heads query heads; choose a divisor")
        problems += self._family_problems()
        if self.rope_scaling == "ntk" and self.rotary_dim <= 2:
            problems.append(f"rope_scaling='ntk' needs more than 2 rotary dims (have {self.rotary_dim}); "
                            f"raise rotary_pct or use rope_scaling='linear'")
        if self.reset_position_ids and not self.document_masking:
            problems.append("reset_position_ids=True needs document_masking=True (positions restart at the "
                            "document boundaries that masking supplies): set both, or drop reset_position_ids")
        if problems:
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(problems))

    def _family_problems(self) -> list[str]:
        """What the chosen family's architecture cannot express (the Hugging Face classes cannot either)."""
        if self.family == "llama":
            return [msg for bad, msg in (
                (self.rotary_pct != 1.0, f"rotary_pct={self.rotary_pct}: family llama rotates every dim of each "
                                         f"head; drop rotary_pct (or set 1.0)"),
                (self.use_parallel_residual, "use_parallel_residual=True: family llama is sequential "
                                             "(attention, then MLP); drop use_parallel_residual"),
            ) if bad]
        return [msg for bad, msg in (
            (self.num_kv_heads != self.num_heads, f"num_kv_heads={self.num_kv_heads}: family gpt-neox has no "
                                                  f"grouped-query attention; drop num_kv_heads or use family llama"),
            (self.tie_word_embeddings, "tie_word_embeddings=True: family gpt-neox (Pythia) keeps its embeddings "
                                       "untied; drop it or use family llama"),
        ) if bad]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that are rotated (the first ones), as GPT-NeoX computes it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def effective_init_std(self) -> float:
        if self.init_std is not None:
            return self.init_std
        return 0.02 if self.family == "llama" else math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def effective_output_init_std(self) -> float:
        if self.output_init_std is not None:
            return self.output_init_std
        if self.family == "llama":
            return 0.02 / math.sqrt(2.0 * self.num_layers)
        return 2.0 / (self.num_layers * math.sqrt(self.hidden_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "ModelConfig":
        """A preset's dimensions (see PRESETS) with `vocab_size` from the tokenizer, plus any field overrides.
        An override of `family` must name the preset's own family."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        valid = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown ModelConfig field(s) {bad}: valid fields are {sorted(valid)}")
        family = PRESETS[name]["family"]
        if overrides.get("family", family) != family:
            same = [n for n, p in PRESETS.items() if p["family"] == overrides["family"]]
            raise ValueError(f"family={overrides['family']!r} disagrees with preset {name!r}, a {family} model: "
                             f"drop the family setting (a preset implies it) or choose a {overrides['family']} "
                             f"preset: {', '.join(same) or 'none'}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
