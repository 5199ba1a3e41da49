"""The one-command GPU acceptance run: is growlength correct and fast on this machine's GPUs? One table, one JSON.

    python benchmarks/gpu_acceptance.py --json OUT.json [--out DIR] [--checks parity,throughput,switch,probe,compare]
        [--timeout-s 480] [--ranks N] [--compare-seconds 90] [--peak-tflops T] [--builtin-dir DIR]
        [--data-prefix PREFIX --tokenizer TOK] [--dry-run]

Checks, with budgets that are shares of --timeout-s (Sizes.shares; what one leaves goes to the next): parity (flash-attn
vs SDPA), throughput (benchmarks/bench_model.py: ours vs transformers per length, and the launcher's step through
the DeepSpeed engine), switch (accumulation change and exact resume through the launcher, deterministic algorithms
enforced), probe (micro-batch caps from bench_lengths hold), compare (GrowLength vs fixed at equal tokens, at most one
epoch of a corpus). Then the speed targets (TARGETS) with met / missed. A check that cannot run is skipped with the
reason; --dry-run runs the same code on the CPU at tiny size. Exit 0 when every check that ran passed, 1 when one
failed, 2 for bad arguments. What each check asserts: docs/gpu.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_pipeline.atomic import check_dir_writable, write_text  # noqa: E402
from data_pipeline.errors import UserError  # noqa: E402

RANK_SCRIPT = "benchmarks/acceptance_rank.py"
CHECKS = ("parity", "throughput", "switch", "probe", "compare")
CORRECTNESS = {"parity", "switch", "probe"}
FLASH_ERROR_FACTOR = 2.0
# the accumulation check's tolerances (relative): the same gradients summed in another order. The DeepSpeed
# boundary bug this guards against gave 5e-3 in the loss.
SWITCH_RTOL = {"cpu": {"loss": 2e-5, "grad_norm": 1e-4}, "cuda": {"loss": 1e-4, "grad_norm": 1e-3}}


class UsageError(UserError):
    """A bad command line: the message names the flag, the value and the fix."""


class OverBudget(RuntimeError):
    """A check ran past its time budget."""


# ---- sizes: the GPU run and the dry run ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    parity_preset: str = "pythia-160m"
    parity_vocab: int = 50277  # Pythia's tokenizer
    parity_len: int = 2048
    parity_batch: int = 2
    bench_preset: str = "pythia-160m"
    bench_vocab: int = 50277
    bench_lengths: tuple = (128, 256, 512, 1024, 2048, 4096)
    bench_tokens: int = 16384
    bench_rounds: int = 3
    switch_preset: str = "pythia-70m"
    switch_lengths: tuple = (256, 512)
    switch_tokens_per_rank: int = 8192  # stage 0: 32 x 256, stage 1: 16 x 512, or 4 x 512 x accum 4
    probe_preset: str = "pythia-160m"
    probe_lengths: tuple = (512, 2048)
    probe_tokens: int = 16384
    probe_memory_cap_gb: float | None = None  # CUDA probes to out-of-memory; the CPU needs a cap
    engine_len: int = 2048  # the launcher-shaped throughput cell: pythia-160m, bf16, the DeepSpeed engine
    engine_tokens: int = 65536
    engine_steps: int = 5
    compare_preset: str = "pythia-70m"
    compare_lengths: tuple = (128, 512, 2048)
    compare_shares: tuple = (0.4, 0.3, 0.3)
    compare_tokens_per_rank: int = 32768
    compare_seconds: float = 90.0
    compare_min_seconds: float = 20.0
    compare_overhead_s: float = 120.0  # calibration, two launcher start-ups, checkpoint evaluation, plots
    compare_points: int = 6
    compare_corpus_chars: int = 200_000_000  # the offline corpus: installed packages' docstrings, at most this much
    compare_speed_vs_bench: float = 2.0  # compare_preset's tokens/s over the throughput cell's (70m vs 160m: >= 2x)
    compare_min_steps: int = 8  # tokens per run: at least this many steps (at most one epoch)
    eval_tokens: int = 8192
    timeout_s: float = 480.0
    # each check's share of --timeout-s; what a check leaves unused goes to the checks after it, so the budgets add
    # up to the timeout whatever subset runs
    shares: dict = field(default_factory=lambda: {"parity": 0.05, "throughput": 0.15, "switch": 0.2, "probe": 0.2,
                                                  "compare": 0.4})

# the DeepSpeed JSON for these sizes (pythia-70m/160m): ZeRO-1 communicates once per optimizer step, ZeRO-2 after
# every micro-batch (docs/ds-configs.md)
DS_CONFIG = "ds_configs/zero1.json"
VALID_FRACTION = 0.05  # of the documents, held out for validation in every launcher run here
# the targets on one H100/H200 (pythia-160m at L=2048, bf16), reported with pass/fail beside the checks
TARGETS = {"mfu_causal": 0.45, "tokens_per_s_vs_transformers": 1.2, "growlength_time_to_target_ratio": 0.75}


GPU = Sizes()
DRY = Sizes(parity_preset="tiny", parity_vocab=512, parity_len=64, bench_preset="tiny", bench_vocab=512,
            bench_lengths=(32, 64), bench_tokens=256, bench_rounds=1, switch_preset="tiny",
            switch_lengths=(32, 64), switch_tokens_per_rank=512, probe_preset="tiny", probe_lengths=(32, 64),
            probe_tokens=256, probe_memory_cap_gb=0.3, compare_preset="tiny", compare_lengths=(32, 64),
            compare_shares=(0.5, 0.5), compare_tokens_per_rank=512, compare_seconds=3.0, compare_min_seconds=1.0,
            compare_overhead_s=60.0, compare_points=2, compare_corpus_chars=1_000_000, compare_speed_vs_bench=0.5,
            eval_tokens=256,
            engine_len=64, engine_tokens=512, engine_steps=1, timeout_s=1500.0,
            # on the CPU every check is mostly process start-ups: the probe starts the most
            shares={"parity": 0.03, "throughput": 0.1, "switch": 0.22, "probe": 0.4, "compare": 0.25})


@dataclass
class Result:
    name: str
    status: str = "passed"   # passed | failed | skipped | error
    reason: str = ""
    figures: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # (figure, value) lines of the table
    seconds: float = 0.0
    budget_s: float = 0.0

    def fail(self, reason: str) -> "Result":
        self.status, self.reason = "failed", (self.reason + "; " if self.reason else "") + reason
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = "correctness" if self.name in CORRECTNESS else "measurement"
        d.pop("rows")
        return d


@dataclass
class Context:
    sizes: Sizes
    out: Path
    ranks: int
    cuda: bool
    dry_run: bool
    deadline: float
    builtin_dir: str | None = None
    peak_tflops: float | None = None
    compare_seconds: float | None = None
    data_prefix: str | None = None
    tokenizer: str | None = None
    engine_tokens_per_s: float | None = None  # the throughput check's launcher-shaped cell, for compare's sizing

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise OverBudget(f"over its {self.seconds:.0f} s budget {what}")


# ---- labels -----------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def labels() -> dict:
    """What every figure was measured on."""
    import torch
    from model.attention import flash_unusable_reason
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else None
    cap = ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None
    flash = _version("flash-attn") or _version("flash_attn")
    return {"gpu": gpu or "none (CPU)", "gpu_count": torch.cuda.device_count() if cuda else 0,
            "compute_capability": cap, "torch": torch.__version__, "cuda": torch.version.cuda,
            "flash_attn": flash or "not installed", "flash_attn_usable": flash_unusable_reason() or "yes",
            "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
            "python": sys.version.split()[0], "host": socket.gethostname()}


def label_line(lab: dict) -> str:
    gpu = f"{lab['gpu']} x{lab['gpu_count']} (sm {lab['compute_capability']})" if lab["gpu_count"] else lab["gpu"]
    return (f"{gpu} | torch {lab['torch']} | CUDA {lab['cuda'] or 'n/a'} | flash-attn {lab['flash_attn']} | "
            f"deepspeed {lab['deepspeed']} | transformers {lab['transformers'] or 'not installed'}")


# ---- processes and files --------------------------------------------------------------------------------------
def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> int:
    """Run ``cmd`` in the repo root in its own process group, output to ``log_path``; past ``timeout`` the group is
    stopped (SIGTERM, then SIGKILL) and OverBudget raised."""
    if timeout <= 0:
        raise OverBudget(f"no time left to start {Path(log_path).stem}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
            raise OverBudget(f"{log_path.stem} still running after {timeout:.0f} s (log {log_path})") from None


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " / ".join(line.strip()[:200] for line in text[-lines:])


def write_json(path: Path, obj) -> Path:
    """Write under a temporary name and rename: a reader never sees half a file."""
    write_text(path, json.dumps(obj, indent=1, default=str))
    return path


def step_records(run_dir: Path) -> dict[int, dict]:
    """The step records of RUN_DIR/metrics.jsonl by step (a torn last line, from a killed run, is skipped)."""
    records = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "kind" not in r:
            records[r["step"]] = r
    return records


def launch(ctx: Context, name: str, overrides: list[str], ds_config: str, budget: Budget, fault: str | None = None,
           memory: bool = False, deterministic: bool = False) -> tuple[int, Path]:
    """``launcher/pretrain.py`` (under benchmarks/acceptance_rank.py) on ``ctx.ranks`` ranks: the deepspeed runner
    for several, a lone process for one. Returns (exit code, run_dir)."""
    from evidence.launch import launch_command
    run_dir = ctx.out / "runs" / name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("GROWLENGTH_FAULT", "GROWLENGTH_ACCEPTANCE_MEMORY", "GROWLENGTH_ACCEPTANCE_DETERMINISTIC"):
        env.pop(key, None)
    if fault:
        env["GROWLENGTH_FAULT"] = fault
    if memory:
        env["GROWLENGTH_ACCEPTANCE_MEMORY"] = str(run_dir.parent / f"{name}.memory")
    if deterministic:
        env["GROWLENGTH_ACCEPTANCE_DETERMINISTIC"] = "1"
    cmd, env = launch_command(ctx.ranks, env=env, script=RANK_SCRIPT)  # the ranks get this process's GPUs
    cmd += ["--ds_config", ds_config, f"run_dir={run_dir}", f"data.cache_dir={ctx.out / 'index-cache'}",
            "logging.tensorboard=false", "logging.log_interval=1", f"logging.eval_tokens={ctx.sizes.eval_tokens}",
            f"data.valid_fraction={VALID_FRACTION}",
            *builtin_overrides(ctx), *overrides]
    return run_logged(cmd, ctx.out / "runs" / f"{name}.log", budget.left(), env), run_dir


def builtin_overrides(ctx: Context) -> list[str]:
    return [f"data.builtin_dir={ctx.builtin_dir}"] if ctx.builtin_dir else []


def memory_report(run_dir: Path) -> dict[int, int]:
    """Peak bytes per training length, the largest over ranks (benchmarks/acceptance_rank.py's files)."""
    peaks: dict[int, int] = {}
    for path in sorted(run_dir.parent.glob(f"{run_dir.name}.memory.rank*.json")):
        for L, b in json.loads(path.read_text())["peak_bytes"].items():
            peaks[int(L)] = max(peaks.get(int(L), 0), b)
    return peaks


def _ds_config(ctx: Context, name: str, **changes) -> str:
    cfg = json.loads((ROOT / DS_CONFIG).read_text())
    cfg.update(changes)
    return str(write_json(ctx.out / name, cfg))


# ---- check: flash-attn vs SDPA logits -------------------------------------------------------------------------
def check_parity(ctx: Context, budget: Budget) -> Result:
    import torch
    from model import CausalLM, ModelConfig
    from model.attention import flash_unusable_reason

    s, res = ctx.sizes, Result("parity")
    device = torch.device("cuda" if ctx.cuda else "cpu")
    torch.manual_seed(0)
    config = ModelConfig.from_preset(s.parity_preset, vocab_size=s.parity_vocab, attention="sdpa")
    model = CausalLM(config).to(device).eval()
    x = torch.randint(0, s.parity_vocab, (s.parity_batch, s.parity_len), device=device)  # (B, T)
    with torch.no_grad():
        ref = model(x).float()  # (B, T, V) fp32 SDPA: the reference both bf16 kernels are measured against
        weights = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        del model
        sdpa_model = CausalLM(config).to(device, torch.bfloat16).eval()
        sdpa_model.load_state_dict(weights)
        sdpa = sdpa_model(x).float()
        del sdpa_model
        err_sdpa = (sdpa - ref).abs().max().item()
        where = f"{s.parity_preset} L={s.parity_len}"
        res.figures.update(preset=s.parity_preset, seq_len=s.parity_len, batch=s.parity_batch, dtype="bf16",
                           max_abs_logit_fp32=ref.abs().max().item(), sdpa_max_abs_err_vs_fp32=err_sdpa)
        res.rows.append((f"max |sdpa bf16 - fp32| logits ({where})", f"{err_sdpa:.4g}"))
        reason = flash_unusable_reason(device, torch.bfloat16)
        if reason:
            res.status, res.reason = "skipped", f"flash-attn vs SDPA not compared: {reason}"
            return res
        budget.check("before the flash-attn forward")
        flash_model = CausalLM(dataclasses.replace(config, attention="flash")).to(device, torch.bfloat16).eval()
        flash_model.load_state_dict(weights)
        flash = flash_model(x).float()
    diff = (flash - sdpa).abs().max().item()
    err_flash = (flash - ref).abs().max().item()
    res.figures.update(flash_vs_sdpa_max_abs_diff=diff, flash_max_abs_err_vs_fp32=err_flash,
                       flash_error_factor_allowed=FLASH_ERROR_FACTOR)
    res.rows += [(f"max |flash - sdpa| logits (bf16, {where})", f"{diff:.4g}"),
                 ("max |flash bf16 - fp32| logits", f"{err_flash:.4g} (allowed {FLASH_ERROR_FACTOR:g} x sdpa's)")]
    if not all(map(math.isfinite, (diff, err_flash, err_sdpa))) or err_flash > FLASH_ERROR_FACTOR * err_sdpa:
        res.fail(f"flash-attn's logits are off: max error {err_flash:.4g} vs SDPA's {err_sdpa:.4g} against fp32")
    return res


# ---- check: forward+backward throughput (benchmarks/bench_model.py, in its own process) -------------------------
def check_throughput(ctx: Context, budget: Budget) -> Result:
    """benchmarks/bench_model.py: ours (SDPA, and flash-attn where it runs) against transformers per length,
    interleaved, and the launcher-shaped cell (the DeepSpeed engine from DS_CONFIG, a real optimizer step)."""
    s, res = ctx.sizes, Result("throughput")
    out = ctx.out / "bench_model.json"
    cmd = [sys.executable, "benchmarks/bench_model.py", "--device", "cuda" if ctx.cuda else "cpu",
           "--preset", s.bench_preset, "--vocab", str(s.bench_vocab), "--lengths", *map(str, s.bench_lengths),
           "--tokens-per-batch", str(s.bench_tokens), "--repeats", str(s.bench_rounds), "--no-compile",
           "--engine", DS_CONFIG, "--engine-length", str(s.engine_len), "--engine-tokens", str(s.engine_tokens),
           "--engine-steps", str(s.engine_steps), "--json", str(out)]
    if ctx.peak_tflops:
        cmd += ["--peak-tflops", str(ctx.peak_tflops)]
    log = ctx.out / "runs" / "bench_model.log"
    code = run_logged(cmd, log, budget.left())
    if code != 0 or not out.is_file():
        return res.fail(f"benchmarks/bench_model.py exited {code}: {tail(log)}")
    bench = json.loads(out.read_text())
    engine = bench["engine"]
    ctx.engine_tokens_per_s = engine["tokens_per_s"]
    names = bench["models"]
    res.figures.update(preset=s.bench_preset, vocab_size=s.bench_vocab, dtype="bf16", tokens_per_batch=s.bench_tokens,
                       rounds=s.bench_rounds, peak_tflops=bench["peak_tflops"], models=names, engine=engine,
                       mfu_conventions="mfu_causal: the attention a causal kernel computes (T(T+1)/2 pairs per row, "
                                       "as the trainer's mfu); mfu_palm: PaLM's full T x T attention term",
                       lengths={str(r["seq_len"]): r["models"] for r in bench["lengths"]}, report=str(out))
    res.rows.append((f"{s.bench_preset} fwd+bwd bf16, {s.bench_tokens:,} tok/batch, {s.bench_rounds} rounds",
                     " | ".join(names) + "  (tok/s, MFU causal / PaLM)"))
    for r in bench["lengths"]:
        cols = [("OOM" if "oom" in c else f"{c['tokens_per_s'] / 1e3:,.1f}k ({_pct(c['mfu_causal'])} / "
                 f"{_pct(c['mfu_palm'])})") for c in (r["models"].get(n, {"oom": "?"}) for n in names)]
        res.rows.append((f"  L={r['seq_len']}", " | ".join(cols)))
    res.rows.append((f"launcher step: {DS_CONFIG} (ZeRO-{engine['zero_stage']}, {engine['precision']}, "
                     f"{engine['optimizer']}), L={engine['seq_len']}, {engine['tokens_per_step']:,} tokens x accum 1",
                     f"{engine['tokens_per_s'] / 1e3:,.1f}k tok/s, {engine['step_s'] * 1e3:.0f} ms/step, MFU causal "
                     f"{_pct(engine.get('mfu_causal'))} / PaLM {_pct(engine.get('mfu_palm'))}"))
    if "flash" not in names:
        res.rows.append(("  flash", "not measured: flash-attn does not run here (torch SDPA is the kernel)"))
    return res


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


# ---- check: the accumulation change at a switch, on NCCL, and exact resume after a kill -----------------------
def check_switch(ctx: Context, budget: Budget) -> Result:
    s, res = ctx.sizes, Result("switch")
    a, b = s.switch_lengths
    tps = s.switch_tokens_per_rank * ctx.ranks
    cap = s.switch_tokens_per_rank // 4  # stage 1's own micro-batch cap: accumulation 4
    stages = "growlength.stages=[{seq_len: %d, tokens: %d}, {seq_len: %d, tokens: %d%s}]"
    accum1 = stages % (a, 2 * tps, b, 4 * tps, "")
    accum4 = stages % (a, 2 * tps, b, 4 * tps, f", max_tokens_per_micro_batch: {cap}")
    common = [f"model.preset={s.switch_preset}", f"growlength.tokens_per_step={tps}", "growlength.grad_accum=null",
              "optimisation.warmup_steps=2", "checkpointing.interval_steps=3", "checkpointing.keep_last=10"]
    fp32 = _ds_config(ctx, "zero1_fp32.json", bf16={"enabled": False})
    kill_at, ckpt_at = 5, 3  # steps: 1-2 stage 0, 3-6 stage 1; a checkpoint at 3, the kill after step 5

    def run(name, plan, fault=None):
        code, run_dir = launch(ctx, name, common + [plan], fp32, budget, fault=fault, memory=True,
                               deterministic=True)
        return code, run_dir, ctx.out / "runs" / f"{name}.log"

    code, ref_dir, log = run("switch-accum1", accum1)
    if code != 0:
        return res.fail(f"the accumulation-1 run exited {code}: {tail(log)}")
    code, run_dir, log = run("switch-accum4", accum4, fault=f"kill@{kill_at}")
    killed = step_records(run_dir)
    if code == 0 or sorted(killed) != list(range(1, kill_at + 1)):
        return res.fail(f"the run with GROWLENGTH_FAULT=kill@{kill_at} exited {code} after steps {sorted(killed)}; "
                        f"expected a kill after step {kill_at}: {tail(log)}")
    code, run_dir, log = run("switch-accum4", accum4)
    if code != 0:
        return res.fail(f"the resumed run exited {code}: {tail(log)}")
    got, want = step_records(run_dir), step_records(ref_dir)
    shapes = {k: [(r["micro_batch_size"], r["grad_accum"]) for r in recs.values()]
              for k, recs in (("accum4", got), ("accum1", want))}
    memory = memory_report(run_dir)
    res.figures.update(preset=s.switch_preset, ranks=ctx.ranks, lengths=[a, b], tokens_per_step=tps, dtype="fp32",
                       backend=_backend(run_dir), micro_batches=shapes, killed_after=kill_at, resumed_from=ckpt_at)
    if sorted(got) != sorted(want) or not got:
        return res.fail(f"steps {sorted(got)} after the resume, the reference has {sorted(want)}")
    if {g for _, g in shapes["accum4"]} != {1, 4} or {g for _, g in shapes["accum1"]} != {1}:
        res.fail(f"the accumulation did not change 1 -> 4 at the switch: {shapes}")
    backend = "nccl" if ctx.cuda else "gloo"
    if res.figures["backend"] != backend:
        res.fail(f"the run's process group used {res.figures['backend']}, expected {backend}")
    rtol = SWITCH_RTOL["cuda" if ctx.cuda else "cpu"]
    rel = {k: max(abs(got[i][k] - want[i][k]) / abs(want[i][k]) for i in want) for k in rtol}
    recomputed = range(ckpt_at + 1, kill_at + 1)
    exact = {i: all(got[i][k] == killed[i][k] for k in ("loss", "grad_norm", "lr")) for i in recomputed}
    worst = max(abs(got[i]["loss"] - killed[i]["loss"]) for i in recomputed)
    res.figures.update(max_rel_diff=rel, rtol=rtol, recomputed_steps=list(recomputed), resume_bitwise=exact,
                       resume_max_abs_loss_diff=worst, peak_bytes_per_length=memory)
    res.rows += [(f"{s.switch_preset} fp32 on {ctx.ranks} rank(s) ({res.figures['backend']}), L {a} -> {b}",
                  f"accum 1 -> 4 at the switch, tokens/step {tps:,}"),
                 ("max rel |loss - accum-1 run's|", f"{rel['loss']:.2g} (tol {rtol['loss']:g})"),
                 ("max rel |grad norm - accum-1 run's|", f"{rel['grad_norm']:.2g} (tol {rtol['grad_norm']:g})"),
                 (f"kill@{kill_at}, resumed from step {ckpt_at}: steps {list(recomputed)} again",
                  "bit for bit" if all(exact.values()) else f"DIFFER (max |loss diff| {worst:.3g})")]
    for k, tol in rtol.items():
        if not rel[k] <= tol:
            res.fail(f"{k} differs from the accumulation-1 run by {rel[k]:.3g} (relative), above {tol:g}")
    if not all(exact.values()):
        res.fail(f"the resumed run recomputed steps {[i for i, ok in exact.items() if not ok]} differently "
                 f"(max |loss diff| {worst:.3g})")
    return res


def _backend(run_dir: Path) -> str:
    for path in run_dir.parent.glob(f"{run_dir.name}.memory.rank0.json"):
        return json.loads(path.read_text()).get("backend") or "none"
    return "unknown"


# ---- check: the memory probe, and a launcher run at the micro-batch it allows ---------------------------------
def check_probe(ctx: Context, budget: Budget) -> Result:
    from launcher.plan import PlanError, max_tokens_per_micro_batch, stage_micro_batches

    s, res = ctx.sizes, Result("probe")
    probe = ctx.out / "probe.json"
    vocab = 8192  # the built-in tokenizer's (data.builtin_vocab_size): the same model as the launcher run's
    cmd = [sys.executable, "-m", "evidence.bench_lengths", "--preset", s.probe_preset, "--vocab-size", str(vocab),
           "--lengths", ",".join(map(str, s.probe_lengths)), "--tokens-per-batch", str(s.probe_tokens),
           "--steps", "1", "--repeats", "1", "--ds_config", str(ROOT / DS_CONFIG), "--json", str(probe)]
    if s.probe_memory_cap_gb:
        cmd += ["--memory-cap-gb", str(s.probe_memory_cap_gb)]
    log = ctx.out / "runs" / "probe-bench_lengths.log"
    code = run_logged(cmd, log, budget.left())
    if code != 0 or not probe.is_file():
        return res.fail(f"evidence.bench_lengths exited {code}: {tail(log)}")
    rows = {r["seq_len"]: r for r in json.loads(probe.read_text())["lengths"]}
    res.figures["probe"] = {str(L): {k: r.get(k) for k in ("micro_batch", "peak_bytes", "max_micro_batch",
                                                          "max_tokens_per_batch")} for L, r in rows.items()}
    how = "doubled to CUDA out-of-memory" if ctx.cuda else f"against a {s.probe_memory_cap_gb:g} GB cap"
    for L, r in rows.items():
        res.rows.append((f"probe L={L} ({how})", f"max micro-batch {r.get('max_micro_batch')} "
                         f"({r.get('max_tokens_per_batch') or 0:,} tokens); peak {r['peak_bytes'] / 2**20:,.0f} MiB "
                         f"at {r['micro_batch']}"))
    last = s.probe_lengths[-1]
    # tokens per step = the longest stage's micro-batch cap on every rank, so that stage runs at exactly the cap; when
    # the shorter stages' accumulation cannot split that exactly, the micro-batch is rounded down to a multiple of 2^k
    try:
        cap_mb = max_tokens_per_micro_batch(str(probe), last) // last
    except PlanError as e:
        return res.fail(f"the probe gives no micro-batch cap at L={last}: {e}")
    plan, problem = None, None
    for multiple in (1, 2, 4, 8, 16, 32):
        tps = max(multiple, cap_mb // multiple * multiple) * last * ctx.ranks
        try:
            plan = stage_micro_batches(str(probe), list(s.probe_lengths), tps, ctx.ranks)
            break
        except PlanError as e:
            problem = e
    if plan is None:
        return res.fail(f"no tokens_per_step near the probe's cap {cap_mb} x {last} splits into every stage: {problem}")
    res.figures.update(probe_cap_micro_batch=cap_mb)
    stages = "[" + ", ".join(f"{{seq_len: {L}, tokens: {2 * tps}}}" for L in s.probe_lengths) + "]"
    overrides = [f"model.preset={s.probe_preset}", f"growlength.tokens_per_step={tps}", "growlength.grad_accum=null",
                 f"growlength.stages={stages}", f"growlength.micro_batch_probe={probe}", "optimisation.warmup_steps=1",
                 "checkpointing.interval_steps=0", "checkpointing.at_stage_end=false"]
    code, run_dir = launch(ctx, "probe-run", overrides, str(ROOT / DS_CONFIG), budget, memory=True)
    log = ctx.out / "runs" / "probe-run.log"
    records = step_records(run_dir)
    if code != 0:
        text = log.read_text(errors="replace") if log.is_file() else ""
        what = "ran out of memory" if "out of memory" in text.lower() else f"exited {code}"
        return res.fail(f"the launcher at the probed micro-batches {plan} {what}: {tail(log)}")
    peaks = memory_report(run_dir)
    capacity = _capacity(run_dir)
    res.figures.update(tokens_per_step=tps, ranks=ctx.ranks, expected=plan, capacity_bytes=capacity, stages={})
    for L in s.probe_lengths:
        recs = [r for r in records.values() if r["seq_len"] == L]
        shape = sorted({(r["micro_batch_size"], r["grad_accum"]) for r in recs})
        peak = peaks.get(L)
        res.figures["stages"][str(L)] = {"micro_batch_and_accum": shape, "steps": len(recs), "peak_bytes": peak}
        share = f" = {peak / capacity:.0%} of {capacity / 2**30:.0f} GiB" if peak and capacity else ""
        res.rows.append((f"launcher stage L={L}", f"mb {shape[0][0] if shape else '?'} x accum "
                         f"{shape[0][1] if shape else '?'}: peak {(peak or 0) / 2**20:,.0f} MiB{share}"))
        if shape != [tuple(plan[L])]:
            res.fail(f"stage L={L} trained at (micro_batch, accum) {shape}, the probe allows {tuple(plan[L])}")
        if not peak:
            res.fail(f"no peak memory was recorded for stage L={L} (benchmarks/acceptance_rank.py)")
    return res


def _capacity(run_dir: Path) -> int | None:
    for path in run_dir.parent.glob(f"{run_dir.name}.memory.rank0.json"):
        return json.loads(path.read_text()).get("capacity_bytes")
    return None


# ---- check: GrowLength vs fixed length on at most one epoch of text ---------------------------------------------
def compare_corpus(ctx: Context) -> dict:
    """The corpus compare trains on: --data-prefix/--tokenizer when given; else the docstrings of every installed
    Python package (data_pipeline.builtin_corpus.iter_installed_documents, up to compare_corpus_chars) tokenized with
    the built-in tokenizer, built once under the built-in directory and reused. {prefix, tokenizer, tokens, source}."""
    from data_pipeline.builtin_corpus import prepare_builtin_dataset, write_installed_corpus
    from data_pipeline.indexed_dataset import IndexedDataset
    from data_pipeline.preprocess import preprocess
    from launcher.config import DataConfig

    if ctx.data_prefix:
        prefix, tokenizer, source = ctx.data_prefix, ctx.tokenizer, f"--data-prefix {ctx.data_prefix}"
    else:
        d = DataConfig()
        root = Path(ctx.builtin_dir or ROOT / d.builtin_dir)
        tokenizer, _ = prepare_builtin_dataset(str(root), vocab_size=d.builtin_vocab_size)
        chars = ctx.sizes.compare_corpus_chars
        prefix = str(root / f"installed-{d.builtin_vocab_size}-{chars}")
        source = f"docstrings of the installed Python packages (up to {chars:,} characters)"
        try:
            IndexedDataset(prefix)
        except Exception:  # noqa: BLE001 - absent or damaged: (re)build it
            corpus = write_installed_corpus(str(root / f"installed-{chars}.jsonl"), chars)
            preprocess([corpus], prefix, tokenizer, workers=os.cpu_count() or 1, progress=False, quiet=True)
    data = IndexedDataset(prefix)
    return {"prefix": prefix, "tokenizer": tokenizer, "source": source, "documents": len(data),
            "tokens": int(sum(int(n) for n in data.sequence_lengths))}


def check_compare(ctx: Context, budget: Budget) -> Result:
    """evidence.compare at equal tokens (each run at most one epoch of the corpus), GrowLength vs fixed-long: the
    validation loss each reached, and the time GrowLength took to reach fixed-long's final loss."""
    s, res = ctx.sizes, Result("compare")
    corpus = compare_corpus(ctx)
    budget.check("after building the corpus")
    want = ctx.compare_seconds or s.compare_seconds
    per_run = min(want, (budget.left() - s.compare_overhead_s) / 2)
    if per_run < s.compare_min_seconds:
        res.status, res.reason = "skipped", (f"{budget.left():.0f} s left: too little for two runs of at least "
                                             f"{s.compare_min_seconds:g} s")
        return res
    tps = s.compare_tokens_per_rank * ctx.ranks
    epoch = int(corpus["tokens"] * (1 - VALID_FRACTION))
    # tokens per run: at most one epoch, and what fixed-long is expected to train in per_run seconds (the throughput
    # check's launcher cell, scaled to this model) so that the pair fits in the budget
    rate = ctx.engine_tokens_per_s * s.compare_speed_vs_bench if ctx.engine_tokens_per_s else None
    tokens = min(epoch, max(int(rate * per_run), s.compare_min_steps * tps) if rate else epoch) // tps * tps
    if tokens < 4 * tps:
        return res.fail(f"{corpus['source']} holds {epoch:,} training tokens: too few for 4 steps of {tps:,} tokens")
    out = ctx.out / "compare"
    cmd = [sys.executable, "-m", "evidence.compare", "--budget-tokens", str(tokens), "--out", str(out),
           "--preset", s.compare_preset, "--ranks", str(ctx.ranks), "--lengths", ",".join(map(str, s.compare_lengths)),
           "--shares", ",".join(map(str, s.compare_shares)), "--tokens-per-step", str(tps), "--ds-config", DS_CONFIG,
           "--plans", "fixed-long,growlength", "--calibration-rounds", "1", "--points", str(s.compare_points),
           "--eval-tokens", str(s.eval_tokens), "--valid-fraction", str(VALID_FRACTION), "--no-extrapolation",
           "--data-prefix", corpus["prefix"], "--tokenizer", corpus["tokenizer"], "data.epochs=error"]
    log = ctx.out / "runs" / "compare.log"
    code = run_logged(cmd, log, budget.left())
    summary = out / "summary.json"
    if code != 0 or not summary.is_file():
        return res.fail(f"evidence.compare exited {code}: {tail(log)}")
    sm = json.loads(summary.read_text())
    grow, fixed = sm["runs"]["growlength"], sm["runs"]["fixed-long"]
    long = sm["long"]
    reached = grow["to_target_train_s"]  # training clock: step and switch times, evaluations excluded
    ratio = reached / fixed["train_s"] if reached is not None else None
    res.figures.update(preset=s.compare_preset, ranks=ctx.ranks, budget_tokens=tokens, epoch_tokens=epoch,
                       epochs_per_run=tokens / epoch, corpus=corpus, lengths=list(s.compare_lengths),
                       shares=list(s.compare_shares), tokens_per_step=tps, target_val_loss=sm["target_val_loss"],
                       time_to_target_ratio=ratio, report=str(out / "report.md"),
                       can_show="whether GrowLength reaches fixed-length's validation loss sooner on text neither run "
                                f"has seen twice ({tokens / epoch:.2f} epochs per run), one seed, {tokens:,} tokens",
                       cannot_show="a converged model, seed-to-seed spread, or loss at Pythia's scale: a smoke test "
                                   "of the claim, not a measurement of its size",
                       runs={n: {k: r[k] for k in ("steps", "tokens_seen", "elapsed_s", "train_s", "val_loss_long",
                                                    "final_train_loss_mean5", "to_target_train_s", "stopped_by")}
                             for n, r in (("growlength", grow), ("fixed-long", fixed))})
    arrow = " -> ".join(map(str, s.compare_lengths))
    res.rows += [(f"{s.compare_preset}, {tokens:,} tokens per run = {tokens / epoch:.2f} epochs of",
                  f"{corpus['source']} ({corpus['tokens']:,} tokens)"),
                 (f"val loss @ L={long}: GrowLength {arrow}",
                  f"{grow['val_loss_long']:.4f} in {grow['train_s']:.1f} s of training"),
                 (f"val loss @ L={long}: fixed {long}",
                  f"{fixed['val_loss_long']:.4f} in {fixed['train_s']:.1f} s of training"),
                 (f"GrowLength's time to fixed-{long}'s final loss",
                  f"{reached:.1f} s = {ratio:.2f}x fixed's" if reached is not None else "not reached"),
                 ("what this can show", res.figures["can_show"]), ("what it cannot", res.figures["cannot_show"])]
    return res


def targets(results: list[Result], dry_run: bool) -> list[dict]:
    """The speed targets (TARGETS) against the figures of throughput and compare: met / missed / n/a, each with the
    figure and where it comes from. Reported beside the checks; they do not change the exit code."""
    by = {r.name: r.figures for r in results}
    tp, cmp = by.get("throughput", {}), by.get("compare", {})
    engine = tp.get("engine") or {}
    longest = max(tp.get("lengths", {"0": {}}), key=int)
    cells = tp.get("lengths", {}).get(longest, {})
    ours = max((c["tokens_per_s"] for n, c in cells.items() if n != "hf" and "tokens_per_s" in c), default=None)
    hf = cells.get("hf", {}).get("tokens_per_s")
    rows = [("mfu_causal", engine.get("mfu_causal"), f"launcher step, L={engine.get('seq_len')}, {DS_CONFIG}"),
            ("tokens_per_s_vs_transformers", ours / hf if ours and hf else None,
             f"best of ours / transformers GPTNeoX at L={longest}"),
            ("growlength_time_to_target_ratio", cmp.get("time_to_target_ratio"),
             "GrowLength's training time to fixed-long's final val loss / fixed-long's training time")]
    out = []
    for name, value, source in rows:
        goal = TARGETS[name]
        met = None if value is None else (value <= goal if name.endswith("ratio") else value >= goal)
        out.append({"target": name, "goal": ("<= " if name.endswith("ratio") else ">= ") + f"{goal:g}",
                    "value": value, "met": met, "source": source, "dry_run": dry_run})
    return out


CHECK_FUNCTIONS = {"parity": check_parity, "throughput": check_throughput, "switch": check_switch,
                   "probe": check_probe, "compare": check_compare}


# ---- running, the table, the exit code --------------------------------------------------------------------------
def budget_for(ctx: Context, name: str, remaining: list[str]) -> float:
    """``name``'s share of the time left, among the checks still to run (``remaining``, ``name`` first): the budgets
    of the checks add up to --timeout-s, and what one leaves unused goes to the later ones."""
    shares = ctx.sizes.shares
    return ctx.left() * shares[name] / sum(shares[n] for n in remaining)


def release_memory(ctx: Context, res: Result) -> None:
    """Free what an in-process check left (the caching allocator keeps its high-water mark otherwise, and the later
    checks and their subprocesses would see a smaller GPU); record what stays reserved."""
    import gc
    import torch
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        res.figures["gpu_reserved_after_bytes"] = torch.cuda.memory_reserved()


def run_check(ctx: Context, name: str, remaining: list[str]) -> Result:
    budget_s = budget_for(ctx, name, remaining)
    t0 = time.monotonic()
    if budget_s <= 1:
        return Result(name, "skipped", "not started: --timeout-s was used up by the checks before it",
                      budget_s=max(budget_s, 0))
    try:
        res = CHECK_FUNCTIONS[name](ctx, Budget(budget_s))
    except OverBudget as e:
        res = Result(name).fail(str(e))
    except Exception as e:  # noqa: BLE001 - one check's crash is its result; the others still run
        crash = ctx.out / f"{name}.traceback.txt"
        crash.write_text(traceback.format_exc())
        first = (str(e).strip().splitlines() or [""])[0][:300]
        res = Result(name, "error", f"{type(e).__name__}: {first} (traceback in {crash})")
    release_memory(ctx, res)
    res.seconds, res.budget_s = time.monotonic() - t0, budget_s
    return res


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.status in ("failed", "error") for r in results) else 0


def table(results: list[Result], lab: dict, dry_run: bool, total_s: float, goals: list[dict]) -> str:
    title = f"GPU acceptance{' (DRY RUN: CPU, tiny sizes; no figure here is a GPU figure)' if dry_run else ''}"
    w = max([len(f) for r in results for f, _ in r.rows] + [40])
    lines = [title, f"on {label_line(lab)}",
             f"{'check':<11} {'status':<8} {'time/budget':>12}  {'figure':<{w}}  value", "-" * (w + 48)]
    for r in results:
        head = f"{r.name:<11} {r.status:<8} {f'{r.seconds:.0f}/{r.budget_s:.0f}s':>12}  "
        rows = r.rows or [("", "")]
        for i, (fig, value) in enumerate(rows):
            lines.append((head if i == 0 else " " * len(head)) + f"{fig:<{w}}  {value}".rstrip())
        if r.reason:
            lines.append(" " * len(head) + f"{'why: ' + r.reason}")
    counts = {k: sum(r.status == k for r in results) for k in ("passed", "failed", "error", "skipped")}
    lines.append("-" * (w + 48))
    lines.append(f"{len(results)} checks in {total_s:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
                 f"; exit {exit_code(results)}")
    lines.append("targets (one H100/H200, pythia-160m at L=2048, bf16; reported, not part of the exit code"
                 + ("; a dry run's figures say nothing about them" if dry_run else "") + "):")
    for g in goals:
        verdict = "n/a" if g["met"] is None else "met" if g["met"] else "MISSED"
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"  {g['target']:<32} {g['goal']:<8} {value:>8}  {verdict:<6} ({g['source']})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the report here (figures, statuses, labels)")
    p.add_argument("--out", default="runs/gpu-acceptance", help="work directory (runs, logs, probe, compare report); "
                   "each invocation uses a new time-stamped directory inside it")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)} to run")
    p.add_argument("--timeout-s", type=float, help="bound on the whole run (default 480 on a GPU, 1500 dry)")
    p.add_argument("--ranks", type=int, help="ranks for the distributed checks (default: every visible GPU; 1 on CPU)")
    p.add_argument("--compare-seconds", type=float, help="training wall-clock per compare run (default 90; dry 3)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU for MFU when the GPU is not in the table")
    p.add_argument("--builtin-dir", help="where the built-in corpus is prepared (default: the launcher's)")
    p.add_argument("--data-prefix", help="compare's corpus (Megatron .bin/.idx prefix; default: the docstrings of "
                                         "the installed Python packages, built once under --builtin-dir)")
    p.add_argument("--tokenizer", help="the tokenizer of --data-prefix (sentencepiece .model or tokenizer.json)")
    p.add_argument("--dry-run", action="store_true", help="every check on the CPU at tiny size, in seconds")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, cuda: bool) -> list[str]:
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    bad = [c for c in checks if c not in CHECKS]
    if bad or not checks:
        raise UsageError(f"--checks {args.checks!r}: unknown {bad or 'empty'}; choose from {','.join(CHECKS)}")
    for flag, value in (("--timeout-s", args.timeout_s), ("--compare-seconds", args.compare_seconds),
                        ("--peak-tflops", args.peak_tflops), ("--ranks", args.ranks)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value:g}: must be positive")
    if args.ranks and cuda and not args.dry_run:
        import torch
        if args.ranks > torch.cuda.device_count():
            raise UsageError(f"--ranks {args.ranks}: only {torch.cuda.device_count()} GPU(s) are visible")
    if bool(args.data_prefix) != bool(args.tokenizer):
        raise UsageError("--data-prefix and --tokenizer go together: give both (the corpus and the tokenizer that "
                         "made it) or neither (the installed packages' docstrings)")
    if args.data_prefix and not Path(args.data_prefix + ".idx").is_file():
        raise UsageError(f"--data-prefix {args.data_prefix}: no {args.data_prefix}.idx; give the prefix of a "
                         f"preprocessed corpus (python -m data_pipeline.preprocess)")
    check_dir_writable(Path(args.json).resolve().parent, "--json", args.json, UsageError)
    return checks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # the CPU rehearsal stays on the CPU on a GPU machine too (launcher, bench_lengths, compare)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    cuda = torch.cuda.is_available() and not args.dry_run
    try:
        checks = check_args(args, cuda)
    except UserError as e:
        print(f"gpu_acceptance: {e}", file=sys.stderr)
        return 2
    if not cuda and not args.dry_run:
        print("gpu_acceptance: no CUDA device is visible; the GPU checks need one (for the CPU rehearsal at tiny "
              "size, add --dry-run)", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else GPU
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out = out.with_name(f"{out.name}-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=False)
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 1)
    start = time.monotonic()
    ctx = Context(sizes=sizes, out=out.resolve(), ranks=ranks, cuda=cuda, dry_run=args.dry_run,
                  deadline=start + (args.timeout_s or sizes.timeout_s),
                  builtin_dir=str(Path(args.builtin_dir).resolve()) if args.builtin_dir else None,
                  peak_tflops=args.peak_tflops, compare_seconds=args.compare_seconds,
                  data_prefix=str(Path(args.data_prefix).resolve()) if args.data_prefix else None,
                  tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None)
    lab = labels()
    results = []
    for i, name in enumerate(checks):
        res = run_check(ctx, name, checks[i:])
        results.append(res)
        print(f"[{name}] {res.status} in {res.seconds:.0f} s{': ' + res.reason if res.reason else ''}", flush=True)
    total = time.monotonic() - start
    goals = targets(results, args.dry_run)
    text = table(results, lab, args.dry_run, total, goals)
    print(text)
    report = {"labels": lab, "dry_run": args.dry_run, "ranks": ranks, "work_dir": str(ctx.out), "seconds": total,
              "timeout_s": args.timeout_s or sizes.timeout_s, "exit_code": exit_code(results),
              "checks": [r.to_dict() for r in results], "targets": goals, "table": text}
    write_json(Path(args.json), report)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
