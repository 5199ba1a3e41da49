"""What each sequence length costs on this hardware at a fixed number of tokens per batch (the paper's Tables 1-3).

    python -m evidence.bench_lengths --preset tiny --lengths 128,256,512,1024 --tokens-per-batch 8192
        [--memory-cap-gb G] [--vocab-size V] [--dtype bf16|fp32] [--steps 2] [--repeats 3] [--json OUT]
        [--ds_config ds_configs/zero2.json] [--ranks N]

Per length: the step time (launcher.steptime: interleaved rounds, medians, noisy lengths flagged), the peak memory
of a step of the run's own DeepSpeed engine, and the largest tokens per batch that fits (to CUDA out-of-memory on a
GPU, against --memory-cap-gb on the CPU). The JSON report feeds `growlength.micro_batch_probe`
(:func:`stage_micro_batches`). Method: docs/tools.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher import steptime
from data_pipeline.errors import UserError
from evidence.runs import EvidenceError, check_writable, parse_lengths, write_json

log = logging.getLogger("growlength")

DEFAULT_VOCAB = {"tiny": 8192}  # the built-in tokenizer; Pythia presets use Pythia's 50277
PYTHIA_VOCAB = 50277
MiB = 1 << 20
DEFAULT_DS_CONFIG = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json")  # the launcher's default
NOISY_HINT = f"max/min above {steptime.NOISY_SPREAD:g}: the machine was noisy; rerun with more --repeats"


# ---- using a probe in the launcher: the reader lives with the plan (the runtime never imports this module) -------
from launcher.plan import load_probe, max_tokens_per_micro_batch, stage_micro_batches  # noqa: E402,F401


# ---- one process's work (in a fresh subprocess on CPU) ------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status (not Linux?)")


def _peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter at the current RSS (``5 > /proc/self/clear_refs``, Linux 4.0+) and
    return that baseline; where that is not allowed, the peak so far is the baseline (an underestimate of what
    comes after it only when an earlier peak was higher)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return _peak_rss_bytes()


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _model(preset: str, vocab_size: int, device, dtype: str):
    from model import CausalLM, ModelConfig
    return CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab_size)).to(device, _dtype(dtype))


def _train_step(model, opt, x) -> None:
    """One training step on x (micro_batch, seq_len + 1): forward, backward, AdamW update."""
    model(x[:, :-1], labels=x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_lengths(preset: str, vocab_size: int, lengths: list[int], tokens_per_batch: int, dtype: str, steps: int,
                 repeats: int, warmup: int = 1, seed: int = 0) -> list[dict[int, list[float]]]:
    """Timed steps per round (``[{seq_len: [seconds]}]``), every length on one model in this process, interleaved
    (launcher.steptime.measure). Raises steptime.OutOfMemory naming the length that did not fit."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model = steptime.run_guarded(lambda: _model(preset, vocab_size, device, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = {L: steptime.run_guarded(  # (micro_batch, L + 1) each
        lambda L=L: torch.randint(0, vocab_size, (tokens_per_batch // L, L + 1), device=device), L) for L in lengths}
    try:
        times = steptime.measure({L: (lambda x=x: _train_step(model, opt, x)) for L, x in batches.items()},
                                 rounds=repeats, steps_per_round=steps, warmup=warmup,
                                 synchronize=torch.cuda.synchronize if cuda else None)
    finally:
        del model, opt, batches
        if cuda:
            torch.cuda.empty_cache()
    return [{L: list(t.rounds[r]) for L, t in times.lengths.items()} for r in range(repeats)]


# a memory measurement runs STEPS optimizer steps of ACCUMULATION micro-batches each: DeepSpeed's accumulation path
# (fp32 accumulation buffers) and the allocator's growth over the first steps are part of the peak (pythia-tiny,
# L=64, micro-batch 12, ZeRO-2 on this CPU: the launcher's peak grew 165, 171 and 183 MiB at accumulation 1, 2, 60,
# over 2 steps)
STEPS, ACCUMULATION = 3, 4
# a CPU answer leaves this share of the cap free: a run's peak RSS still grows a little after the probe's steps
CPU_HEADROOM = 0.03


def probe_ds_config(ds_config: str, dtype: str | None, micro_batch: int, world: int) -> dict:
    """The run's DeepSpeed JSON as the probe trains under it: its ZeRO stage, buckets, offload, precision and
    optimizer as they are; the batch keys for one micro-batch per step; no scheduler (it allocates nothing, and its
    step counts follow from a plan). ``dtype`` "fp32" turns the JSON's bf16/fp16 off; otherwise its precision."""
    from launcher.ds_config import load_ds_config
    cfg = {k: v for k, v in load_ds_config(ds_config).items() if k != "scheduler"}
    if dtype == "fp32":
        cfg["bf16"], cfg["fp16"] = {"enabled": False}, {"enabled": False}
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=ACCUMULATION,
               train_batch_size=micro_batch * ACCUMULATION * world)
    return cfg


def measure_memory(preset: str, vocab_size: int, seq_len: int, micro_batch: int, dtype: str | None = None,
                   seed: int = 0, warmup_micro_batch: int | None = None, ds_config: str = DEFAULT_DS_CONFIG) -> dict:
    """Peak memory in bytes of this rank's training step through the launcher's DeepSpeed engine (``ds_config``:
    ZeRO partitioning of the fp32 master weights and moments over the ranks of the process group, gradient buckets,
    offload) on random tokens (micro_batch, seq_len), in steady state: after a first step at
    ``warmup_micro_batch`` (default: the same), which allocates the optimizer's state and leaves the allocator's
    slack (see the module docstring for what the peak is on GPU and CPU). Starts a process group of one when none
    exists (run_isolated starts one per rank). Raises steptime.OutOfMemory."""
    import torch.distributed as dist
    from launcher import engine as ds

    own_group = not dist.is_initialized()
    if own_group:  # called in-process: a group of one, dropped (and the environment restored) at the end
        env_before = dict(os.environ)
        ds.init_distributed()
    try:
        return _measure_memory(preset, vocab_size, seq_len, micro_batch, dtype, seed, warmup_micro_batch, ds_config)
    finally:
        if own_group:
            ds.close()
            os.environ.clear()
            os.environ.update(env_before)


def _measure_memory(preset, vocab_size, seq_len, micro_batch, dtype, seed, warmup_micro_batch, ds_config) -> dict:
    import torch
    import torch.distributed as dist
    from launcher import distributed
    from launcher import engine as ds
    from launcher.optim import param_groups
    from model import CausalLM, ModelConfig

    world = dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = distributed.device()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # load kernels and libraries first (a throw-away 1x8 step), so the baseline excludes one-time costs
        warm = _model("tiny", 128, device, "fp32")
        w = torch.randint(0, 128, (1, 9))
        warm(w[:, :-1], labels=w[:, 1:]).backward()
        del warm, w
        base = reset_peak_rss()
    torch.manual_seed(seed)
    engine = x = None
    cfg = probe_ds_config(ds_config, dtype, micro_batch, world)

    def step() -> None:
        nonlocal engine, x
        model = CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab_size))  # as the launcher builds it
        engine = ds.create_engine(model, cfg, param_groups(model))
        x = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), device=device)
        # optimizer steps of ACCUMULATION micro-batches, as the launcher's: the last ones are the steady state
        for batch in (x[:warmup_micro_batch or micro_batch],) + (x,) * (STEPS - 1):
            for i in range(ACCUMULATION):
                ds.set_accumulation_boundary(engine, i == ACCUMULATION - 1)
                loss = engine(batch[:, :-1], labels=batch[:, 1:])
                engine.backward(loss)
            engine.step()  # once per optimizer step, after its last micro-batch (the launcher's train_step)
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    try:
        steptime.run_guarded(step, seq_len)
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    finally:
        del engine, x
        gc.collect()  # the engine's reference cycles hold the device memory until collected
        if cuda:
            torch.cuda.empty_cache()
    return {"seq_len": seq_len, "micro_batch": micro_batch, "peak_bytes": int(peak),
            "device": "cuda" if cuda else "cpu", "ranks": world, "seconds": time.perf_counter() - t0}


def _worker(job: dict) -> dict:
    """``--_worker`` mode: one job in this fresh process; an allocation failure comes back as ``{"oom": ...}``."""
    kind = job.pop("kind")
    try:
        if kind == "memory":
            return measure_memory(**job)
        if kind == "search":
            return search_max_batch(**job)
        rounds = time_lengths(**job)
        return {"rounds": [{str(L): t for L, t in r.items()} for r in rounds]}
    except steptime.OutOfMemory as e:
        return {"oom": {"seq_len": e.seq_len, "detail": e.detail}}


def run_isolated(job: dict, ranks: int = 1) -> dict:
    """:func:`_worker` in fresh processes, one per rank, joined in a process group as the launcher's ranks are
    (CPU: each rank's peak RSS then belongs to its job alone, and the memory goes back to the system when it
    ends; CUDA: rank r on GPU r). A memory job's result is the rank with the highest peak. A process killed by
    SIGKILL (the kernel's OOM killer) counts as out of memory."""
    root = Path(__file__).resolve().parents[1]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS=threads, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "evidence.bench_lengths", "--_worker", json.dumps(job)],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [(p, *p.communicate()) for p in procs]
    results = []
    for proc, stdout, stderr in outs:
        if proc.returncode == -9:
            return {"oom": {"seq_len": job.get("seq_len"), "detail": "the process was killed (SIGKILL: the kernel's "
                                                                        "out-of-memory killer?)"}}
        if proc.returncode != 0:
            raise RuntimeError(f"measurement {job} failed:\n{stderr[-2000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    ooms = [r for r in results if "oom" in r]
    if ooms:
        return ooms[0]
    return max(results, key=lambda r: r.get("peak_bytes", 0))


def _too_big(what: str, oom: dict, device: str) -> EvidenceError:
    where = f"at seq_len {oom['seq_len']}" if oom.get("seq_len") else "(the model alone)"
    return EvidenceError(f"{what} does not fit in {device} memory {where}: {oom['detail']}; lower "
                         f"--tokens-per-batch (or use a smaller --preset or --vocab-size)")


# ---- the largest batch that fits --------------------------------------------------------------------------------
# the GPU search stops when the bracket [fits, fails) is narrower than this share of the fitting micro-batch
GPU_RESOLUTION = 0.1


def max_batch_gpu(preset, vocab_size, seq_len, dtype, fits_mb: int, ds_config: str = None, ranks: int = 1) -> dict:
    """The largest micro-batch that trains on the GPU to GPU_RESOLUTION: :func:`search_max_batch` in one fresh
    process per rank (the whole search, not one process per try). Returns its result."""
    return run_isolated(dict(kind="search", preset=preset, vocab_size=vocab_size, seq_len=seq_len, dtype=dtype,
                             fits_mb=fits_mb, ds_config=ds_config or DEFAULT_DS_CONFIG), ranks)


def next_try(lo: int, hi: int | None, resolution: float = GPU_RESOLUTION) -> int | None:
    """The search's next micro-batch, given the largest that fitted (``lo``) and the smallest that did not (``hi``,
    None before the first failure): double until one fails, then bisect until the bracket is narrower than
    ``resolution`` x lo; None when done."""
    if hi is None:
        return 2 * lo
    if hi - lo <= max(1, int(lo * resolution)):
        return None
    return (lo + hi) // 2


def search_max_batch(preset, vocab_size, seq_len, dtype, fits_mb: int, ds_config: str) -> dict:
    """In this process: the largest micro-batch whose training steps (:func:`measure_memory`, under ``ds_config``)
    run without running out of memory, from ``fits_mb`` (known to fit) by :func:`next_try`, with the allocator's
    cache emptied between tries; every rank of the group must fit. ``{"max_micro_batch", "tries"}``."""
    import torch
    import torch.distributed as dist
    from launcher import distributed
    from launcher import engine as ds

    own_group = not dist.is_initialized()
    if own_group:
        ds.init_distributed()
    lo, hi, tries = fits_mb, None, []
    try:
        while (mb := next_try(lo, hi)) is not None:
            try:
                peak = _measure_memory(preset, vocab_size, seq_len, mb, dtype, 0, fits_mb, ds_config)["peak_bytes"]
            except steptime.OutOfMemory:
                peak = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failed = distributed.all_reduce_sum_tensor(torch.tensor([float(peak is None)],
                                                                    device=distributed.device()))[0]
            tries.append({"micro_batch": mb, "fits": not failed, "peak_bytes": peak})
            lo, hi = (mb, hi) if not failed else (lo, mb)
    finally:
        if own_group:
            ds.close()
    return {"max_micro_batch": lo, "tries": tries}


def _memory_isolated(preset, vocab_size, seq_len, dtype, micro_batch, warmup_micro_batch=None, ds_config=None,
                     ranks: int = 1) -> dict:
    return run_isolated(dict(kind="memory", preset=preset, vocab_size=vocab_size, seq_len=seq_len,
                             micro_batch=micro_batch, dtype=dtype, warmup_micro_batch=warmup_micro_batch,
                             ds_config=ds_config or DEFAULT_DS_CONFIG), ranks)


# a CPU answer is verified by measuring it when that measurement's steps cost at most this many model FLOPs (about
# a minute on 2 cores; counted, not timed, so the decision does not depend on how busy the machine is); a larger one
# is the fit's prediction, labelled so
CPU_VERIFY_FLOPS = 1e13


def measurement_flops(preset: str, vocab_size: int, seq_len: int, micro_batch: int) -> float:
    """Model FLOPs of one memory measurement's training steps (STEPS x ACCUMULATION micro-batches)."""
    import torch
    from model import CausalLM, ModelConfig
    with torch.device("meta"):  # the FLOP count reads the config; no weights are made
        model = CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab_size))
    return STEPS * ACCUMULATION * micro_batch * seq_len * model.flops_per_token(seq_len)


def max_batch_cpu(preset, vocab_size, seq_len, dtype, first: dict, cap_bytes: int,
                  fixed_bytes: float | None = None, ds_config: str = None, ranks: int = 1,
                  verify_flops: float = CPU_VERIFY_FLOPS) -> tuple[int, list[dict], float, str]:
    """Largest micro-batch whose peak stays under ``cap_bytes``: affine fit (peak = fixed + micro_batch x
    per-micro-batch cost) from ``first`` and a second point at half its micro-batch, then verified by measuring the
    prediction and stepping down while it is over the cap, when that measurement costs at most ``verify_flops``
    (:func:`measurement_flops`); otherwise the prediction stands.

    ``fixed_bytes`` (weights, gradients, optimizer state: the same at every length), when another length already
    measured it, saves the second measurement here. Returns (micro_batch, the measurements made, fixed_bytes, how:
    "measured" or "predicted")."""
    checks = []
    per_mb = (first["peak_bytes"] - fixed_bytes) / first["micro_batch"] if fixed_bytes is not None else 0.0
    if per_mb <= 0:  # no shared fit yet (or it does not hold at this length): a second point here, the cheaper side
        other = first["micro_batch"] // 2 if first["micro_batch"] >= 2 else 2
        second = _memory_isolated(preset, vocab_size, seq_len, dtype, other, min(other, first["micro_batch"]),
                                  ds_config, ranks)
        if "oom" in second:
            return first["micro_batch"], [second], first["peak_bytes"], "measured"
        checks.append(second)
        per_mb = max(1.0, (second["peak_bytes"] - first["peak_bytes"]) / (other - first["micro_batch"]))
        fixed_bytes = first["peak_bytes"] - per_mb * first["micro_batch"]
    cap_bytes = int(cap_bytes * (1 - CPU_HEADROOM))
    mb = max(0, int((cap_bytes - fixed_bytes) // per_mb))
    for _ in range(4):
        if mb < 1:
            return 0, checks, fixed_bytes, "measured"
        if measurement_flops(preset, vocab_size, seq_len, mb) > verify_flops:
            return mb, checks, fixed_bytes, "predicted"
        check = _memory_isolated(preset, vocab_size, seq_len, dtype, mb, min(mb, first["micro_batch"]), ds_config,
                                 ranks)
        checks.append(check)
        if "oom" not in check and check["peak_bytes"] <= cap_bytes:
            return mb, checks, fixed_bytes, "measured"
        mb = int(mb * 0.8) if "oom" in check else int(mb * cap_bytes / check["peak_bytes"] * 0.97)
    return 0, checks, fixed_bytes, "measured"  # four over the cap: report nothing rather than an unmeasured guess


# ---- the benchmark ---------------------------------------------------------------------------------------------
def check_args(preset: str, lengths: list[int], tokens_per_batch: int, memory_cap_gb: float | None, steps: int,
               repeats: int) -> None:
    if tokens_per_batch <= 0:
        raise EvidenceError(f"--tokens-per-batch {tokens_per_batch}: must be positive")
    bad = [L for L in lengths if tokens_per_batch % L]
    if bad:
        raise EvidenceError(f"--tokens-per-batch {tokens_per_batch} is not a multiple of length(s) {bad}: the "
                            f"micro-batch is tokens_per_batch / seq_len; use a multiple of {max(lengths)}")
    if memory_cap_gb is not None and memory_cap_gb <= 0:
        raise EvidenceError(f"--memory-cap-gb {memory_cap_gb}: must be positive")
    if steps < 1 or repeats < 1:
        raise EvidenceError(f"--steps {steps} --repeats {repeats}: both must be at least 1 (timed steps per length "
                            f"per round, and rounds)")
    from model.config import PRESETS
    if preset not in PRESETS:
        raise EvidenceError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")


def time_rows(times: steptime.StepTimes, tokens_per_batch: int) -> dict[int, dict]:
    """The timing fields of each length's row (the JSON keeps step_s and step_time_ratio, the median's)."""
    rows = {}
    for L in times.lengths:
        row = {"seq_len": L, "micro_batch": tokens_per_batch // L, "tokens_per_batch": tokens_per_batch,
               **times.row(L)}
        row["tokens_per_s"] = tokens_per_batch / row["step_s"]
        if row["noisy"]:
            row["hint"] = NOISY_HINT
        rows[L] = row
    return rows


def bench(preset: str, lengths: list[int], tokens_per_batch: int, memory_cap_gb: float | None = None,
          vocab_size: int | None = None, dtype: str = "bf16", steps: int = 2, repeats: int = 3,
          ds_config: str = DEFAULT_DS_CONFIG, ranks: int = 1) -> dict:
    import torch

    check_args(preset, lengths, tokens_per_batch, memory_cap_gb, steps, repeats)
    if vocab_size is not None and vocab_size < 1:
        raise EvidenceError(f"--vocab-size {vocab_size}: must be at least 1 (omit it for the preset's vocabulary)")
    vocab_size = vocab_size or DEFAULT_VOCAB.get(preset, PYTHIA_VOCAB)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t_start = time.perf_counter()
    job = dict(preset=preset, vocab_size=vocab_size, lengths=lengths, tokens_per_batch=tokens_per_batch, dtype=dtype,
               steps=steps, repeats=repeats)
    try:
        rounds = time_lengths(**job) if cuda else run_isolated(dict(kind="time", **job))
    except steptime.OutOfMemory as e:
        rounds = {"oom": {"seq_len": e.seq_len, "detail": e.detail}}
    if "oom" in rounds:
        raise _too_big(f"a batch of --tokens-per-batch {tokens_per_batch}", rounds["oom"], device)
    if not cuda:
        rounds = [{int(L): t for L, t in r.items()} for r in rounds["rounds"]]
    times = steptime.summarize(rounds)
    rows = time_rows(times, tokens_per_batch)
    log.info("step times (%d rounds x %d timed steps per length, interleaved, %.0fs):\n%s", repeats, steps,
             time.perf_counter() - t_start, steptime.table(times))
    fixed = None
    for L, row in rows.items():
        mb = row["micro_batch"]
        m = _memory_isolated(preset, vocab_size, L, dtype, mb, None, ds_config, ranks)
        if "oom" in m:
            raise _too_big(f"micro_batch {mb}", m["oom"], device)
        row.update(peak_bytes=m["peak_bytes"], device=m["device"])
        if cuda:
            found = max_batch_gpu(preset, vocab_size, L, dtype, mb, ds_config, ranks)
            row.update(max_micro_batch=found["max_micro_batch"], probe_checks=found["tries"], max_how="measured")
        elif memory_cap_gb:
            row["max_micro_batch"], row["probe_checks"], fixed, row["max_how"] = max_batch_cpu(
                preset, vocab_size, L, dtype, m, int(memory_cap_gb * (1 << 30)), fixed, ds_config, ranks)
        if "max_micro_batch" in row:
            row["max_tokens_per_batch"] = row["max_micro_batch"] * L
        log.info("L=%d: peak %.1f MiB%s", L, m["peak_bytes"] / MiB,
                 f", max {row['max_tokens_per_batch']:,} tokens" if "max_tokens_per_batch" in row else "")
    rows = list(rows.values())
    longest = rows[-1]
    for r in rows:
        r["memory_ratio"] = r["peak_bytes"] / longest["peak_bytes"] if longest["peak_bytes"] > 0 else None
        if longest.get("max_tokens_per_batch"):
            r["max_tokens_ratio"] = r["max_tokens_per_batch"] / longest["max_tokens_per_batch"]
    warning = times.warning()
    if warning:
        log.warning("%s", warning)
    return {"preset": preset, "vocab_size": vocab_size, "dtype": dtype, "tokens_per_batch": tokens_per_batch,
            "device": device, "memory_cap_gb": memory_cap_gb, "ds_config": ds_config, "ranks": ranks,
            "threads": torch.get_num_threads(), "steps": steps,
            "repeats": repeats, "warmup": 1, "noisy_lengths": times.noisy(), "warning": warning,
            "elapsed_s": time.perf_counter() - t_start, "lengths": rows}


def table(report: dict) -> str:
    """The paper's Tables 1-3 side by side: time (median, max/min, ratio with its range over rounds), memory and the
    largest batch per length, ratios to the longest."""
    cap = "" if report["device"] == "cuda" else (f", cap {report['memory_cap_gb']:g} GB" if report["memory_cap_gb"]
                                                 else ", no --memory-cap-gb: max tokens not probed")
    lines = [f"{report['preset']} ({report['dtype']}, {report['device']}{cap}), {report['tokens_per_batch']:,} tokens "
             f"per batch; {report['repeats']} rounds x {report['steps']} timed steps per length, interleaved; "
             f"ratios are to L={report['lengths'][-1]['seq_len']}",
             f"{'seq_len':>7} {'mb':>5} {'step s':>8} {'max/min':>8} {'ratio':>6} {'range':>9} {'tok/s':>9} "
             f"{'peak MiB':>9} {'ratio':>6} {'max tokens':>11} {'ratio':>6}", "-" * 94]
    for r in report["lengths"]:
        mem_ratio = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") is not None else "n/a"
        max_tok = ("~" if r.get("max_how") == "predicted" else "") + f"{r['max_tokens_per_batch']:,}" \
            if r.get("max_tokens_per_batch") is not None else "n/a"
        max_ratio = f"{r['max_tokens_ratio']:.2f}" if r.get("max_tokens_ratio") is not None else "n/a"
        spread = f"{r['step_s_spread']:.2f}" + ("!" if r["noisy"] else " ")
        span = f"{r['step_time_ratio_min']:.2f}-{r['step_time_ratio_max']:.2f}"
        lines.append(f"{r['seq_len']:>7} {r['micro_batch']:>5} {r['step_s']:>8.4f} {spread:>8} "
                     f"{r['step_time_ratio']:>6.2f} {span:>9} {r['tokens_per_s']:>9,.0f} "
                     f"{r['peak_bytes'] / MiB:>9.1f} {mem_ratio:>6} {max_tok:>11} {max_ratio:>6}")
    lines.append("step s: median of the timed steps; range: the ratio's lowest and highest over rounds"
                 + (f"; ! {NOISY_HINT}" if report["noisy_lengths"] else ""))
    if any(r.get("max_how") == "predicted" for r in report["lengths"]):
        lines.append(f"~ max tokens predicted by the memory fit, not measured (its measurement would cost over "
                     f"{CPU_VERIFY_FLOPS:.0e} model FLOPs)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (model/config.py PRESETS)")
    p.add_argument("--lengths", default="128,256,512,1024", help="comma-separated sequence lengths")
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="tokens per batch at every length")
    p.add_argument("--memory-cap-gb", type=float, help="CPU: memory the largest batch must fit in (GiB)")
    p.add_argument("--vocab-size", type=int, help="default: 8192 for tiny (built-in tokenizer), else 50277")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (ds_configs train bf16)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per length in each round")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all lengths (after one warm-up step each); "
                                                          "raise it when a length is flagged noisy")
    p.add_argument("--ds_config", "--ds-config", default=DEFAULT_DS_CONFIG,
                   help="the run's DeepSpeed JSON: memory is measured through this engine (ZeRO stage, buckets, "
                        "offload, optimizer); default the launcher's ds_configs/zero2.json")
    p.add_argument("--ranks", type=int, default=1, help="the run's ranks per node: memory is measured on as many "
                                                         "ranks (ZeRO partitions over them); the highest rank counts")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # worker mode: one isolated job (a memory or timing run)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
        if args.ranks < 1 or (gpus is not None and args.ranks > gpus):
            raise EvidenceError(f"--ranks {args.ranks}: must be at least 1" + (f" and at most the {gpus} visible GPUs"
                                if gpus is not None else "") + " (one process per rank, as in the run)")
        if args.json:  # before the measurement: a report that cannot be saved is refused, not lost
            check_writable(args.json, "--json")
        from launcher.ds_config import load_ds_config
        load_ds_config(args.ds_config)
        report = bench(args.preset, parse_lengths(args.lengths), args.tokens_per_batch, args.memory_cap_gb,
                       args.vocab_size, args.dtype, args.steps, args.repeats, args.ds_config, args.ranks)
    except UserError as e:
        log.error("%s", e)
        return 2
    print(table(report))
    if args.json:
        try:
            log.info("wrote %s", write_json(args.json, report, "--json"))
        except EvidenceError as e:
            log.error("%s (the table above is the report)", e)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
