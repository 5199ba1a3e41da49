"""torch.compile per GrowLength stage (`model.compile: true | false | auto`).

Each decoder block is compiled in place with static shapes before `deepspeed.initialize`, so ZeRO's hooks see the
same parameters. At each stage switch :meth:`StageCompiler.compile_stage` builds the stage's graph on a throw-away
batch (no parameter gradient) and times it; later compiles in a stage are counted and logged as warnings. Where the
compiler cannot build, `true` raises :class:`CompileError` and `auto` trains eager with one warning. Why this way:
docs/model.md.
"""
from __future__ import annotations

import logging
import time

import torch
import torch._dynamo

from data_pipeline.errors import UserError
from model import CausalLM

log = logging.getLogger("growlength")

_warned: set[str] = set()
MIN_RECOMPILE_LIMIT = 64  # graphs per block code object: one per (stage length, grad mode), validation lengths too


class CompileError(UserError):
    """``model.compile: true`` but torch.compile cannot build this model here; the message says how to proceed."""


def _first_line(exc: BaseException) -> str:
    """The line of a compiler failure that says what failed (inductor's C++ errors run to thousands of lines)."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line and "warning" not in line]
    head = lines[0] if lines else type(exc).__name__
    return (head + (f" ({errors[0][:240]})" if errors else ""))[:400]


def _refuse_or_warn(mode, what: str) -> bool:
    """``compile: true``: raise :class:`CompileError`; ``auto``: warn once and return False (train eager)."""
    if mode is True:
        raise CompileError(f"model.compile=true: {what}; set model.compile=false (eager) or model.compile=auto "
                           f"(eager with a warning where the compiler fails)")
    if what not in _warned:  # one warning per cause (start-up and the first switch may both find it)
        _warned.add(what)
        log.warning("model.compile=auto: %s; training eager", what)
    return False


def check_compiler(mode, device: torch.device) -> bool:
    """Start-up check, before anything expensive: whether compiling can start here at all (on CPU, inductor needs
    a C++ compiler: ``$CXX`` or g++). Returns whether to compile; raises :class:`CompileError` for
    ``compile: true`` where it cannot."""
    if mode is False:
        return False
    if not torch._dynamo.is_dynamo_supported():
        return _refuse_or_warn(mode, f"torch.compile is not supported with this Python/torch ({torch.__version__})")
    if device.type == "cpu":
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or a broken one
            tried = [c for c in inductor_config.cpp.cxx if c]
            return _refuse_or_warn(mode, f"inductor found no working C++ compiler on this CPU machine (tried "
                                         f"{', '.join(tried)}); install g++ or point $CXX at one")
    return True


class StageCompiler:
    """Compiles the model's blocks once, then builds one graph per stage length at the switch.

    ``mode``: the config's ``model.compile`` (True, False or "auto"). ``enabled`` is False when off or when
    ``auto`` fell back to eager."""

    def __init__(self, model: CausalLM, mode, device: torch.device, dtype: torch.dtype):
        if not (isinstance(mode, bool) or mode == "auto"):
            raise ValueError(f"model.compile must be true, false or 'auto', got {mode!r}")
        self.model, self.mode, self.device, self.dtype = model, mode, device, dtype
        self.enabled = check_compiler(mode, device)
        self.stage_index: int | None = None
        self.recompiles = 0           # graphs built for training (grad enabled) after the stage's warm-up
        self.eval_graphs = 0          # graphs built under no_grad (validation at a new length)
        self.seconds: dict[int, float] = {}  # stage index -> compile seconds of its warm-up
        self._warming = False
        if not self.enabled:
            return
        torch._dynamo.reset()  # a fresh cache and counters for this run (another may have run in this process)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MIN_RECOMPILE_LIMIT)
        torch._dynamo.callback_handler.register_start_callback(self._on_compile)
        for block in model.layers:
            block.compile(dynamic=False)

    def _on_compile(self, args) -> None:
        """Dynamo's compile-start callback: a frame compiled outside the warm-up is counted (and logged)."""
        if self._warming or self.stage_index is None or args.callback_trigger.name != "DYNAMO":
            return
        if not torch.is_grad_enabled():
            self.eval_graphs += 1
            return
        self.recompiles += 1
        log.warning("torch.compile: recompile %d within stage %d (compile id %s); expected none: shapes should "
                    "be static within a stage", self.recompiles, self.stage_index, args.compile_id)

    def compile_stage(self, stage_index: int, micro_batch_size: int, seq_len: int) -> float | None:
        """Build the stage's graph before its first step: one forward + backward of the blocks at
        (micro_batch_size, seq_len) on a throw-away batch. Returns the seconds it took (None when eager).
        Raises :class:`CompileError` for ``compile: true`` when the compiler fails; ``auto`` turns compile off."""
        if not self.enabled:
            return None
        self.stage_index, self.recompiles = stage_index, 0
        self._warming = True
        t0 = time.perf_counter()
        try:
            self._warm_up(micro_batch_size, seq_len)
        except Exception as e:  # noqa: BLE001 - any compiler failure: inductor raises many kinds
            self._failed(e, seq_len)
            return None
        finally:
            self._warming = False
        self.seconds[stage_index] = time.perf_counter() - t0
        return self.seconds[stage_index]

    def _warm_up(self, micro_batch_size: int, seq_len: int) -> None:
        c = self.model.config
        gen = torch.Generator(device="cpu").manual_seed(seq_len)
        h0 = torch.randn(micro_batch_size, seq_len, c.hidden_size, generator=gen).to(self.device, self.dtype)
        h0.requires_grad_(True)  # (B, T, d): stands for the embedding's output
        cu = None
        if c.document_masking:  # training batches carry their documents: the graph must take them too
            # every row split in two documents (the row starts are boundaries in any case)
            starts = torch.arange(micro_batch_size, dtype=torch.int32) * seq_len
            inner = starts + max(1, seq_len // 2) if seq_len > 1 else starts[:0]
            cu = torch.cat([torch.stack([starts, inner], 1).reshape(-1) if seq_len > 1 else starts,
                            torch.tensor([micro_batch_size * seq_len], dtype=torch.int32)])  # CPU, as loaders
        h = self.model.blocks(h0, cu)  # the loop CausalLM.forward runs
        torch.autograd.grad(h.float().square().mean(), [h0])  # builds the backward graph; no parameter grads

    def _failed(self, exc: Exception, seq_len: int) -> None:
        what = (f"torch.compile (inductor) cannot build this model on {self.device.type} in "
                f"{str(self.dtype).replace('torch.', '')} at seq_len {seq_len}: {_first_line(exc)}")
        self.enabled = _refuse_or_warn(self.mode, what)
        for block in self.model.layers:  # back to the eager forward (nn.Module.compile's attribute)
            block._compiled_call_impl = None
        torch._dynamo.reset()

    def stage_fields(self, stage_index: int) -> dict:
        """The ``"kind": "stage"`` record's compile fields."""
        return {"compile": self.enabled, "compile_s": self.seconds.get(stage_index)}

    def describe(self, stage_index: int) -> str:
        """The stage line's compile part."""
        if not self.enabled:
            return "eager"
        return f"compiled in {self.seconds.get(stage_index, 0.0):.1f}s"

    def close(self) -> None:
        if self.mode is not False:
            callbacks = torch._dynamo.callback_handler.start_callbacks
            if self._on_compile in callbacks:
                callbacks.remove(self._on_compile)
