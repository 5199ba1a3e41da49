"""metrics.jsonl, TensorBoard and the step line (rank 0 writes); the record fields: docs/training.md.

Throughput is counted at the real length: tokens/s from the tokens the step used; `tflops`/`mfu` from the
attention the step computed (`attn_flops`), `tflops_palm`/`mfu_palm` from PaLM's full-square
`flops_per_token(seq_len)` for comparison.
"""
from __future__ import annotations

import json
import logging
import math
import re
import statistics
from pathlib import Path

from data_pipeline.atomic import write_text
from data_pipeline.errors import UserError

log = logging.getLogger("growlength")

METRICS_FILE = "metrics.jsonl"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s per GPU, from NVIDIA's datasheets, keyed by the model token
# of torch.cuda.get_device_name() and a variant token (None = the name without one). The names distinguish the
# variants: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" say so. V100 and T4
# have no bf16 tensor cores: their fp16 peak is given. AWS's A10G is absent on purpose (no NVIDIA datasheet; its
# clocks differ from the A10's): pass --peak-tflops.
GPU_PEAK_TFLOPS: dict[tuple[str, str | None], float] = {
    ("B200", None): 2250.0, ("GB200", None): 2500.0,
    ("H200", None): 989.5, ("H200", "NVL"): 835.5, ("GH200", None): 989.5,
    ("H100", None): 989.5, ("H100", "PCIe"): 756.5, ("H100", "NVL"): 835.5,
    ("H800", None): 989.5, ("H800", "PCIe"): 756.5,
    ("A100", None): 312.0, ("A800", None): 312.0, ("A30", None): 165.0, ("A40", None): 149.7,
    ("L40S", None): 362.05, ("L40", None): 181.05, ("L4", None): 121.0, ("A10", None): 125.0,
    ("A6000", None): 154.8, ("4090", None): 165.2, ("3090", None): 71.0,
    ("V100", None): 125.0, ("T4", None): 65.0,
}
_VARIANTS = ("PCIe", "NVL")
_hinted: set[str] = set()


def gpu_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name, matched on whole tokens ("A10" is not "A100" nor "A10G")."""
    tokens = re.split(r"[\s\-_/]+", device_name)
    variant = next((v for v in _VARIANTS if v in tokens), None)
    for token in tokens:
        for key in ((token, variant), (token, None)):  # a variant the table does not list has the model's peak
            if key in GPU_PEAK_TFLOPS:
                return GPU_PEAK_TFLOPS[key]
    return None


def peak_tflops(configured: float | None, device_name: str | None) -> float | None:
    """Peak TFLOP/s per device for MFU: the configured value, else the GPU table's, else None (MFU is then null;
    an unknown GPU gets one log line saying how to give its peak)."""
    if configured:
        return configured
    if not device_name:
        return None
    peak = gpu_peak_tflops(device_name)
    if peak is None and device_name not in _hinted:
        _hinted.add(device_name)
        log.info("GPU %r is not in the peak table (launcher/metrics.py GPU_PEAK_TFLOPS): mfu is null; pass "
                 "--peak-tflops (logging.peak_tflops) with its dense bf16 TFLOP/s to get MFU", device_name)
    return peak


class MetricsError(UserError):
    """A metrics.jsonl that cannot be read; the message names FILE:LINE and the fix."""


def _parse(path: Path) -> tuple[list[dict], bool]:
    """``(records, clean)`` of a metrics file. A last line that is not a whole record (what a kill or a full disk
    leaves: cut mid-write, NUL-padded, or missing its newline) is dropped with a warning, or kept when it parses
    but lacks its newline; ``clean`` is False in both cases, so that a rewrite can restore the file. A bad line
    anywhere else raises :class:`MetricsError`."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    clean = raw.endswith(b"\n") or not raw
    if lines and not lines[-1]:
        lines.pop()  # after the final newline
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if n == len(lines):
                log.warning("%s:%d: dropped a torn last line (%d bytes; the writer was stopped mid-record): %r",
                            path, n, len(line), line[:80])
                return records, False
            raise MetricsError(f"{path}:{n}: not a JSON record ({e}); the file is damaged in the middle: restore "
                               f"it from a backup, or delete that line (the run's checkpoints do not depend on it)"
                               ) from None
        records.append(record)
    return records, clean


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl ([] when absent); see :func:`_parse` for a torn last line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return _parse(path)[0]


def truncate_after(run_dir: str | Path, step: int) -> int:
    """Drop records past ``step`` (written after the checkpoint we resume from), so every step appears once, and a
    torn last line, so that the records the resumed run appends start on a line of their own.

    Returns how many records were dropped. Rewrites the file atomically.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    records, clean = _parse(path)
    # a stage record at the checkpoint's step announces the step after it: the resumed run writes it again
    keep = [r for r in records if r.get("step", 0) < step or (r.get("step") == step and r.get("kind") != "stage")]
    if len(keep) != len(records) or not clean:
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(records) - len(keep)


class MetricsWriter:
    """Appends JSON records to RUN_DIR/metrics.jsonl, scalars to TensorBoard, and the same records to the trackers
    (``wandb``: the ``logging.wandb`` mapping; ``run_info``: the config and plan they record once). A no-op off
    rank 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, wandb: dict | None = None,
                 run_info: dict | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._trackers = []
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(run_dir) / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb is not None and wandb.get("mode", "online") != "disabled":
            from launcher.trackers import WandbSink
            self._trackers.append(WandbSink(wandb, run_dir, run_info or {}))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        for tracker in self._trackers:
            tracker.log(record)
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key in ("step", "kind") or not isinstance(value, (int, float)) or value is None:
                    continue
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def step_throughput(model, tokens: int, seq_len: int, attention_pairs: int, seconds: float, world: int,
                    peak: float | None) -> dict:
    """A step's rates per device (``model`` is a CausalLM): tokens/s, and model FLOPs with the attention it computed
    (causal, within documents: ``attention_pairs`` query-key pairs) for tflops and mfu, and with PaLM's convention
    (full T x T) for comparison with papers."""
    attn_flops, attn_flops_palm = model.attention_flops(attention_pairs), model.attention_flops(tokens * seq_len)
    tflops = (model.matmul_flops_per_token() * tokens + attn_flops) / seconds / world / 1e12
    tflops_palm = model.flops_per_token(seq_len) * tokens / seconds / world / 1e12
    return {"tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "tflops_palm": tflops_palm, "mfu_palm": tflops_palm / peak if peak else None,
            "attn_flops": attn_flops, "attn_flops_palm": attn_flops_palm}


def eta_seconds(model, plan, stage, step: int, step_times: list[float]) -> float:
    """Seconds left: this stage's remaining steps at its median step time, later stages scaled by FLOPs per token."""
    per_token = model.flops_per_token(stage.seq_len)
    later = sum(s.steps * model.flops_per_token(s.seq_len) / per_token for s in plan.stages if s.index > stage.index)
    return statistics.median(step_times) * (stage.last_step - step + later)


def summary_lines(plan, progress, elapsed_s: float, last_loss: float, last_eval: dict) -> list[str]:
    """The end-of-run report: totals and the last losses, then one line per stage (steps, tokens, time, tok/s)."""
    p = progress
    lines = [f"done: {p.step} steps, {p.tokens_seen:,} tokens in {fmt_duration(elapsed_s)}; final train loss "
             f"{last_loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in last_eval.items() if k.startswith("val_loss"))]
    for s in plan.stages:
        done = min(max(p.step - s.first_step, 0), s.steps)
        tokens = done * plan.tokens_per_step
        secs = p.stage_seconds.get(str(s.index), 0.0)
        lines.append(f"  stage {s.index} L={s.seq_len:<5d} {done:6d}/{s.steps} steps {tokens:13,} tokens "
                     f"{fmt_duration(secs):>9s} {f'{tokens / secs:,.0f}' if secs else '-':>10s} tok/s")
    return lines


def step_line(r: dict, eta_s: float) -> str:
    """``step 1200 | stage 2 L=512 mb=8 | loss 3.412 | lr 2.9e-04 | gnorm 0.91 | tok/s 41.2k | mfu 38% | eta 3m10s``"""
    gnorm = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.2f}"
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.0%}"
    return (f"step {r['step']} | stage {r['stage']} L={r['seq_len']} mb={r['micro_batch_size']} | "
            f"loss {r['loss']:.3f} | lr {r['lr']:.1e} | gnorm {gnorm} | tok/s {fmt_count(r['tokens_per_s'])} | "
            f"tflops {r['tflops']:.3g} | mfu {mfu} | eta {fmt_duration(eta_s)}")
