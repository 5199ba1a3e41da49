"""What each sequence length costs on this hardware at a fixed number of tokens per batch (the paper's Tables 1-3).

    python -m launcher.bench_lengths --preset tiny --lengths 128,256,512,1024 --tokens-per-batch 8192
        [--memory-cap-gb G] [--vocab-size V] [--dtype bf16|fp32] [--steps 5] [--json OUT]

Per length L, with micro_batch = tokens_per_batch / L: the median time of a training step (forward, backward and an
AdamW update of the model in ``--dtype``; DeepSpeed's ZeRO bookkeeping is not included, it is the same at every
length), the peak memory of that step, and the largest tokens per batch (a multiple of L) that fits. Ratios are to
the longest length, as in the paper.

Memory, honestly measured:
  GPU  ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state, activations), reset per
       measurement; the largest batch is found by doubling micro_batch until CUDA runs out of memory, then
       bisecting between the last fit and the first failure.
  CPU  there is no allocator counter, so each measurement runs in a fresh subprocess and reports the growth of the
       process's peak resident set (Linux VmHWM, which the kernel keeps per process) from just before the model
       is built to the end of the steps: weights, gradients, optimizer state, activations and the allocator's
       slack, but not the Python/torch runtime. The largest batch against ``--memory-cap-gb`` is predicted from
       two measurements (peak is affine in the micro-batch at a fixed length) and then verified by measuring it,
       stepping down while the measurement exceeds the cap.

For the launcher, :func:`max_tokens_per_micro_batch` and :func:`stage_micro_batches` turn a saved report into
per-stage micro-batches (``micro_batch * seq_len <= max tokens that fit``, tokens per step unchanged).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launcher.runs import EvidenceError, parse_lengths, write_json

log = logging.getLogger("growlength")

DEFAULT_VOCAB = {"tiny": 8192}  # the built-in tokenizer; Pythia presets use Pythia's 50277
PYTHIA_VOCAB = 50277
MiB = 1 << 20


# ---- using a probe in the launcher (pure Python: no torch) ------------------------------------------------------
def load_probe(probe: dict | str | Path) -> dict:
    if isinstance(probe, dict):
        return probe
    try:
        return json.loads(Path(probe).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvidenceError(f"{probe}: not a readable bench_lengths JSON ({e}); write one with "
                            f"python -m launcher.bench_lengths --json OUT") from None


def max_tokens_per_micro_batch(probe: dict | str | Path, seq_len: int, safety: float = 0.9) -> int:
    """Tokens per micro-batch (per rank) that fit at ``seq_len``, from a bench_lengths report, times ``safety``.

    A length that was not probed takes the value of the next longer probed length (memory per token grows with
    length, so that is a safe bound); a length longer than every probed one is refused."""
    rows = sorted((r for r in load_probe(probe)["lengths"] if r.get("max_tokens_per_batch")),
                  key=lambda r: r["seq_len"])
    longer = [r for r in rows if r["seq_len"] >= seq_len]
    if not longer:
        raise EvidenceError(f"seq_len {seq_len} is longer than every length in the probe "
                            f"({[r['seq_len'] for r in rows]}); rerun bench_lengths with --lengths up to {seq_len}")
    fit = longer[0]["max_tokens_per_batch"]
    return max(seq_len, int(fit * safety) // seq_len * seq_len)


def stage_micro_batches(probe: dict | str | Path, seq_lens: list[int], tokens_per_step: int, world_size: int,
                        safety: float = 0.9) -> dict[int, tuple[int, int]]:
    """``{seq_len: (micro_batch_size, grad_accum)}`` per stage: the smallest accumulation whose micro-batch fits
    the probe at that length, keeping ``tokens_per_step`` exact (launcher.plan.micro_batch_for's rule)."""
    from launcher.plan import micro_batch_for
    return {L: micro_batch_for(L, tokens_per_step, world_size, None,
                               max_tokens_per_micro_batch(probe, L, safety), f"stage seq_len {L}")
            for L in seq_lens}


# ---- one measurement --------------------------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not in /proc/self/status (not Linux?)")


def measure(preset: str, vocab_size: int, seq_len: int, micro_batch: int, dtype: str, steps: int,
            warmup: int = 1, seed: int = 0) -> dict:
    """Train ``steps`` steps of a fresh model on random tokens (micro_batch, seq_len): median step seconds and peak
    memory in bytes (see the module docstring for what the peak is on GPU and CPU). Raises torch.OutOfMemoryError
    on a GPU that cannot fit it."""
    import torch
    from model import GPTNeoX, ModelConfig

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # load kernels and libraries first (a throw-away 1x8 step), so the baseline excludes one-time costs
        warm = GPTNeoX(ModelConfig.from_preset("tiny", vocab_size=128)).to(DTYPES[dtype])
        w = torch.randint(0, 128, (1, 9))
        warm(w[:, :-1], labels=w[:, 1:]).backward()
        del warm, w
        base = _peak_rss_bytes()
    torch.manual_seed(seed)
    model = GPTNeoX(ModelConfig.from_preset(preset, vocab_size=vocab_size)).to(device, DTYPES[dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), device=device)
    times = []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            model(x[:, :-1], labels=x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    finally:
        del model, opt, x
        if cuda:
            torch.cuda.empty_cache()
    return {"seq_len": seq_len, "micro_batch": micro_batch, "step_s": statistics.median(times),
            "peak_bytes": int(peak), "device": "cuda" if cuda else "cpu"}


def measure_isolated(**kwargs) -> dict:
    """:func:`measure` in a fresh process (CPU: the peak RSS then belongs to this measurement alone)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "launcher.bench_lengths", "--_measure", json.dumps(kwargs)],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {kwargs} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the largest batch that fits --------------------------------------------------------------------------------
def max_batch_gpu(preset, vocab_size, seq_len, dtype, start_mb: int) -> int:
    """Double the micro-batch until CUDA OOM, then bisect; returns the largest micro-batch that ran."""
    import torch

    def fits(mb: int) -> bool:
        try:
            measure(preset, vocab_size, seq_len, mb, dtype, steps=1, warmup=0)
            return True
        except torch.OutOfMemoryError:
            return False

    lo, hi = 0, max(1, start_mb)
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch_cpu(preset, vocab_size, seq_len, dtype, first: dict, cap_bytes: int) -> tuple[int, list[dict]]:
    """Largest micro-batch whose measured peak stays under ``cap_bytes``: affine fit through two measurements,
    then verified by measuring the prediction (and stepping down while it is over the cap)."""
    second = measure_isolated(preset=preset, vocab_size=vocab_size, seq_len=seq_len,
                              micro_batch=2 * first["micro_batch"], dtype=dtype, steps=1)
    per_mb = max(1.0, (second["peak_bytes"] - first["peak_bytes"]) / first["micro_batch"])
    fixed = first["peak_bytes"] - per_mb * first["micro_batch"]
    mb = max(0, int((cap_bytes - fixed) // per_mb))
    checks = [second]
    for _ in range(4):
        if mb < 1:
            return 0, checks
        check = measure_isolated(preset=preset, vocab_size=vocab_size, seq_len=seq_len, micro_batch=mb,
                                 dtype=dtype, steps=1)
        checks.append(check)
        if check["peak_bytes"] <= cap_bytes:
            return mb, checks
        mb = int(mb * cap_bytes / check["peak_bytes"] * 0.97)
    return mb, checks


# ---- the benchmark ---------------------------------------------------------------------------------------------
def bench(preset: str, lengths: list[int], tokens_per_batch: int, memory_cap_gb: float | None = None,
          vocab_size: int | None = None, dtype: str = "bf16", steps: int = 5) -> dict:
    import torch

    if tokens_per_batch <= 0:
        raise EvidenceError(f"--tokens-per-batch {tokens_per_batch}: must be positive")
    bad = [L for L in lengths if tokens_per_batch % L]
    if bad:
        raise EvidenceError(f"--tokens-per-batch {tokens_per_batch} is not a multiple of length(s) {bad}: the "
                            f"micro-batch is tokens_per_batch / seq_len; use a multiple of {max(lengths)}")
    if memory_cap_gb is not None and memory_cap_gb <= 0:
        raise EvidenceError(f"--memory-cap-gb {memory_cap_gb}: must be positive")
    from model.config import PRESETS
    if preset not in PRESETS:
        raise EvidenceError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    vocab_size = vocab_size or DEFAULT_VOCAB.get(preset, PYTHIA_VOCAB)
    cuda = torch.cuda.is_available()
    rows = []
    for L in lengths:
        mb = tokens_per_batch // L
        kw = dict(preset=preset, vocab_size=vocab_size, seq_len=L, micro_batch=mb, dtype=dtype)
        m = measure(steps=steps, **kw) if cuda else measure_isolated(steps=steps, **kw)
        row = {**m, "tokens_per_batch": tokens_per_batch, "tokens_per_s": tokens_per_batch / m["step_s"]}
        if cuda:
            row["max_micro_batch"] = max_batch_gpu(preset, vocab_size, L, dtype, mb)
        elif memory_cap_gb:
            row["max_micro_batch"], row["probe_checks"] = max_batch_cpu(preset, vocab_size, L, dtype, m,
                                                                        int(memory_cap_gb * (1 << 30)))
        if "max_micro_batch" in row:
            row["max_tokens_per_batch"] = row["max_micro_batch"] * L
        rows.append(row)
        log.info("L=%d: %.3fs/step, peak %.1f MiB%s", L, m["step_s"], m["peak_bytes"] / MiB,
                 f", max {row['max_tokens_per_batch']:,} tokens" if "max_tokens_per_batch" in row else "")
    longest = rows[-1]
    for r in rows:
        r["step_time_ratio"] = r["step_s"] / longest["step_s"]
        r["memory_ratio"] = r["peak_bytes"] / longest["peak_bytes"] if longest["peak_bytes"] > 0 else None
        if longest.get("max_tokens_per_batch"):
            r["max_tokens_ratio"] = r["max_tokens_per_batch"] / longest["max_tokens_per_batch"]
    return {"preset": preset, "vocab_size": vocab_size, "dtype": dtype, "tokens_per_batch": tokens_per_batch,
            "device": "cuda" if cuda else "cpu", "memory_cap_gb": memory_cap_gb,
            "threads": torch.get_num_threads(), "steps": steps, "lengths": rows}


def table(report: dict) -> str:
    """The paper's Tables 1-3 side by side: time, memory and the largest batch per length, ratios to the longest."""
    cap = "" if report["device"] == "cuda" else (f", cap {report['memory_cap_gb']:g} GB" if report["memory_cap_gb"]
                                                 else ", no --memory-cap-gb: max tokens not probed")
    lines = [f"{report['preset']} ({report['dtype']}, {report['device']}{cap}), {report['tokens_per_batch']:,} tokens "
             f"per batch; ratios are to L={report['lengths'][-1]['seq_len']}",
             f"{'seq_len':>7} {'mb':>5} {'step s':>8} {'ratio':>6} {'tok/s':>9} {'peak MiB':>9} {'ratio':>6} "
             f"{'max tokens':>11} {'ratio':>6}", "-" * 75]
    for r in report["lengths"]:
        mem_ratio = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") is not None else "n/a"
        max_tok = f"{r['max_tokens_per_batch']:,}" if r.get("max_tokens_per_batch") is not None else "n/a"
        max_ratio = f"{r['max_tokens_ratio']:.2f}" if r.get("max_tokens_ratio") is not None else "n/a"
        lines.append(f"{r['seq_len']:>7} {r['micro_batch']:>5} {r['step_s']:>8.4f} {r['step_time_ratio']:>6.2f} "
                     f"{r['tokens_per_s']:>9,.0f} {r['peak_bytes'] / MiB:>9.1f} {mem_ratio:>6} {max_tok:>11} "
                     f"{max_ratio:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (model/config.py PRESETS)")
    p.add_argument("--lengths", default="128,256,512,1024", help="comma-separated sequence lengths")
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="tokens per batch at every length")
    p.add_argument("--memory-cap-gb", type=float, help="CPU: memory the largest batch must fit in (GiB)")
    p.add_argument("--vocab-size", type=int, help="default: 8192 for tiny (built-in tokenizer), else 50277")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (ds_configs train bf16)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per length (after one warm-up step)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--_measure", help=argparse.SUPPRESS)  # worker mode: one isolated measurement
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(**json.loads(args._measure))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = bench(args.preset, parse_lengths(args.lengths), args.tokens_per_batch, args.memory_cap_gb,
                       args.vocab_size, args.dtype, args.steps)
    except EvidenceError as e:
        log.error("%s", e)
        return 2
    print(table(report))
    if args.json:
        log.info("wrote %s", write_json(args.json, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
