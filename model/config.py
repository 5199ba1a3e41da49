"""ModelConfig: the Pythia / GPT-NeoX architecture's knobs, presets, and their validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ROPE_SCALINGS = ("none", "linear", "ntk")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa")

# Pythia's published dimensions (Biderman et al. 2023, Table 1; EleutherAI/pythia configs/*.yml).
# All use rotary_pct 0.25, rope_base 10000, parallel residual, LayerNorm eps 1e-5, intermediate = 4 * hidden.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4),
    "pythia-70m": dict(hidden_size=512, num_layers=6, num_heads=8),
    "pythia-160m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "pythia-410m": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "pythia-1b": dict(hidden_size=2048, num_layers=16, num_heads=8),
}


@dataclass
class ModelConfig:
    """Architecture of a GPT-NeoX (Pythia) decoder. There is no block size: any sequence length runs."""

    vocab_size: int
    """Tokenizer vocabulary size (kept for export); the embedding has `padded_vocab_size` rows."""
    hidden_size: int
    """Width d of the residual stream."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads; head_dim = hidden_size / num_heads."""
    intermediate_size: int | None = None
    """MLP inner width; None means 4 * hidden_size (Pythia)."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get rotary embeddings, in (0, 1] (Pythia: 0.25)."""
    rope_base: float = 10000.0
    """RoPE base theta."""
    rope_scaling: str = "none"
    """Position scaling for evaluation beyond the trained length: none | linear (interpolation) | ntk."""
    rope_scaling_factor: float = 1.0
    """Factor for rope_scaling: positions / factor (linear) or base * factor^(r/(r-2)) (ntk); >= 1."""
    use_parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)) (Pythia) instead of sequential attention then MLP."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    attention: str = "auto"
    """Attention backend: auto (flash-attn on CUDA fp16/bf16 when installed, else SDPA) | flash | sdpa."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory on long stages)."""
    init_std: float | None = None
    """Std of the normal init of embeddings, qkv, MLP-in and the LM head; None = Pythia's small_init sqrt(2/(5d))."""
    output_init_std: float | None = None
    """Std for attention-out and MLP-out weights; None = Pythia's wang_init 2/(num_layers*sqrt(d))."""
    vocab_pad_multiple: int = 128
    """The embedding and LM head are padded to a multiple of this (speed); 1 disables padding."""

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "vocab_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r}: must be a positive integer")
        if problems:  # later checks divide by these
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(problems))
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                            f"choose num_heads dividing hidden_size")
        elif not 0.0 < self.rotary_pct <= 1.0:
            problems.append(f"rotary_pct={self.rotary_pct}: must be in (0, 1] (Pythia uses 0.25)")
        else:
            rd = self.rotary_dim
            if rd < 2 or rd % 2:
                problems.append(
                    f"rotary dims = int(head_dim {self.head_dim} * rotary_pct {self.rotary_pct}) = {rd}: RoPE "
                    f"rotates pairs, so this must be even and >= 2; change rotary_pct or hidden_size/num_heads "
                    f"so that head_dim * rotary_pct is an even integer")
        if self.rope_base <= 0:
            problems.append(f"rope_base={self.rope_base}: must be > 0 (Pythia uses 10000)")
        if self.rope_scaling == "ntk" and self.rotary_dim <= 2:
            problems.append(f"rope_scaling='ntk' needs more than 2 rotary dims (have {self.rotary_dim}); "
                            f"raise rotary_pct or use rope_scaling='linear'")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling={self.rope_scaling!r}: choose one of {', '.join(ROPE_SCALINGS)}")
        if self.rope_scaling_factor < 1.0:
            problems.append(f"rope_scaling_factor={self.rope_scaling_factor}: must be >= 1 "
                            f"(e.g. eval length / trained length)")
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps={self.layer_norm_eps}: must be > 0")
        for name in ("init_std", "output_init_std"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name}={value}: must be > 0, or None for Pythia's default")
        if problems:
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(problems))

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
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5.0 * self.hidden_size))

    @property
    def effective_output_init_std(self) -> float:
        if self.output_init_std is not None:
            return self.output_init_std
        return 2.0 / (self.num_layers * math.sqrt(self.hidden_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "ModelConfig":
        """A preset's dimensions (see PRESETS) with `vocab_size` from the tokenizer, plus any field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        valid = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown ModelConfig field(s) {bad}: valid fields are {sorted(valid)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
