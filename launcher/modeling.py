"""Building the run's model, and timing its steps before the engine exists (the time_share probe).

``model_config_for`` turns the model section (and the tokenizer's vocabulary) into a ModelConfig, or reads
``model.init_from_hf``'s config.json; ``build_model`` makes the model; ``probe_step_times`` times an optimizer step
at each stage length with the one measurer, launcher.steptime.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import torch

from data_pipeline.errors import DatasetError
from data_pipeline.provenance import check_checkpoint_tokenizer
from data_pipeline.tokenizer import Tokenizer
from launcher import distributed as dist
from launcher import steptime
from launcher.config import ConfigError, ModelSection, RunConfig
from launcher.plan import Stage
from model import CausalLM, ModelConfig

log = logging.getLogger("growlength")


def run_model_config(m: ModelSection, tokenizer: Tokenizer, saved_model: dict | None = None) -> ModelConfig:
    """:func:`model_config_for`, with the model's own checks reported as config errors of the model section."""
    try:
        return model_config_for(m, tokenizer, saved_model)
    except (ConfigError, DatasetError):
        raise
    except ValueError as e:
        raise ConfigError(f"model section: {e}") from e


# model fields a Hugging Face start (model.init_from_hf) may set: how it runs, not its architecture
HF_RUNTIME = ("attention", "deterministic_attention", "activation_checkpointing", "document_masking",
              "reset_position_ids")


def model_config_for(m: ModelSection, tokenizer: Tokenizer, saved_model: dict | None = None) -> ModelConfig:
    """The run's ModelConfig: the preset with the section's model fields, or the architecture of model.init_from_hf's
    config.json (read only; its weights are loaded by build_model) with the section's runtime fields. A resumed
    init_from_hf run takes the architecture from its checkpoint (`saved_model`, the state's model fields): the
    checkpoint holds the whole model, so the Hugging Face directory may be gone."""
    settings = m.model_settings()
    if not m.init_from_hf:
        return ModelConfig.from_preset(m.preset, vocab_size=tokenizer.vocab_size, **settings)
    from model.hf import read_hf_config
    fixed = [k for k in settings if k not in HF_RUNTIME + ("family",)]
    if fixed:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: the architecture comes from its config.json; "
                          f"drop model.{', model.'.join(fixed)}")
    runtime = {k: v for k, v in settings.items() if k in HF_RUNTIME}
    if saved_model is not None:
        return dataclasses.replace(ModelConfig(**saved_model), **runtime)
    try:
        config = read_hf_config(m.init_from_hf, **runtime)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: no config.json there; give a Hugging Face "
                          f"GPT-NeoX or Llama directory (save_pretrained's layout)") from None
    except ValueError as e:
        raise ConfigError(f"model.init_from_hf {m.init_from_hf}: {e}") from None
    if m.family is not None and m.family != config.family:
        raise ConfigError(f"model.family={m.family} but model.init_from_hf {m.init_from_hf} holds a {config.family} "
                          f"model: drop model.family or point init_from_hf at a {m.family} directory")
    if config.vocab_size < tokenizer.vocab_size:
        raise DatasetError(f"model.init_from_hf {m.init_from_hf} has vocabulary {config.vocab_size} but the "
                           f"tokenizer {tokenizer.path} has {tokenizer.vocab_size}: give the checkpoint's own "
                           f"tokenizer as data.tokenizer (and preprocess with it)")
    check_checkpoint_tokenizer(m.init_from_hf, tokenizer, "model.init_from_hf")
    return config


def deterministic_kernels(model_config: ModelConfig, device: torch.device) -> None:
    """model.deterministic_attention on CUDA: torch's deterministic algorithms for the whole step (torch's attention
    backward reads them; flash-attn takes deterministic=True itself), with cuBLAS's fixed workspace that they
    require. An op without a deterministic CUDA kernel then raises instead of drifting."""
    if not (model_config.deterministic_attention and device.type == "cuda"):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts: before any matmul
    torch.use_deterministic_algorithms(True)
    log.info("model.deterministic_attention: torch deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s)",
             os.environ["CUBLAS_WORKSPACE_CONFIG"])


def build_model(cfg: RunConfig, model_config: ModelConfig, resuming: bool = False) -> CausalLM:
    """The model, seeded by the run's seed: random init, or model.init_from_hf's weights (not when `resuming`: the
    checkpoint's weights replace them)."""
    torch.manual_seed(cfg.seed)
    model = CausalLM(model_config)
    if cfg.model.init_from_hf and not resuming:
        from model.hf import load_hf_weights
        try:
            load_hf_weights(model, cfg.model.init_from_hf)
        except ValueError as e:
            raise ConfigError(f"model.init_from_hf: {e}") from e
    return model


def probe_step_times(model_config: ModelConfig, rank: int, stages: list[Stage], dtype: torch.dtype = torch.float32,
                     rounds: int = 3) -> list[float]:
    """Seconds per optimizer step of each stage as the plan runs it (``plan_from_config`` passes the stages'
    ``seq_len``, ``micro_batch_size`` and ``grad_accum``, chosen by launcher.plan's one rule): this rank's
    micro-batches (forward + backward each, then an AdamW update), on a throw-away copy of the model in the
    training dtype.

    launcher.steptime's measurer: a warm-up step per length, then ``rounds`` rounds over the lengths in turn;
    the median per length; on CUDA the clock is read after a synchronize. The slowest rank's median counts.
    Only the ratios between lengths matter for a time-share plan with a token total. (The engine's own ZeRO
    step cannot be timed here: the plan this probe sizes is what the engine's scheduler is built from.)"""
    device = dist.device()
    seq_lens = [s.seq_len for s in stages]
    shapes = {s.seq_len: (s.micro_batch_size, s.grad_accum) for s in stages}
    times = oom = None
    try:
        model = steptime.run_guarded(lambda: CausalLM(model_config).to(device=device, dtype=dtype))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x: torch.Tensor, accum: int) -> None:  # x: (micro_batch, seq_len + 1)
            for _ in range(accum):
                model(x[:, :-1], labels=x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def batch(L: int, mb: int) -> torch.Tensor:  # (mb, L + 1); may be the first allocation that fails
            return steptime.run_guarded(
                lambda: torch.randint(0, model_config.vocab_size, (mb, L + 1), device=device), L)

        steps = {L: functools.partial(step, batch(L, mb), accum) for L, (mb, accum) in shapes.items()}
        times = steptime.measure(steps, rounds=rounds, warmup=1,
                                 synchronize=torch.cuda.synchronize if device.type == "cuda" else None)
    except steptime.OutOfMemory as e:
        oom = e  # every rank learns of it below, so no rank is left waiting in the collective
    finally:
        model = opt = steps = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = len(seq_lens)
    mine = times.medians() + [t.spread for t in times.lengths.values()] if times else [math.inf] * 2 * n
    worst = dist.all_reduce_max(mine)
    out, spreads = worst[:n], worst[n:]
    if math.inf in out:
        where = f"at seq_len {oom.seq_len} ({oom.detail})" if oom else "on another rank"
        raise ConfigError(f"the step-time probe for time_share stages ran out of memory {where}: lower "
                          f"growlength.max_tokens_per_micro_batch (more accumulation), or give the stages "
                          f"tokens/share budgets instead of time_share")
    log.info("step-time probe: %s (median of %d rounds; max/min %s)",
             ", ".join(f"L={L}: {t:.6f}s" for L, t in zip(seq_lens, out)), rounds,
             ", ".join(f"{s:.2f}" for s in spreads))
    noisy = [f"L={L} {s:.2f}x" for L, s in zip(seq_lens, spreads) if s > steptime.NOISY_SPREAD]
    if noisy and rank == 0:
        log.warning("step-time probe: the machine was noisy (max/min above %g at %s): the time_share plan "
                    "rests on medians of %d steps; give the stages tokens/share budgets for an exact plan",
                    steptime.NOISY_SPREAD, ", ".join(noisy), rounds)
    return out
