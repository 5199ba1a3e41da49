"""GrowLength pretraining on a DeepSpeed ZeRO engine.

    deepspeed launcher/pretrain.py --ds_config ds_configs/zero2.json [--config RUN.yaml] [key=value ...]

``main()`` parses, builds, trains and closes; ``train()`` is the loop, with the stage switch as an explicit,
logged block inside it. Tokens per optimizer step are the same in every stage; at a switch the engine's
micro-batch (and accumulation) change and the next stage's loader starts where the stream left off.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script (the deepspeed launcher's way): import our packages, not siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import logging
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher import checkpoint as ckpt
from launcher import compile as compiling
from launcher import distributed as dist
from launcher import engine as ds
from launcher.config import ConfigError, RunConfig, load_config
from launcher.data import TrainData, prepare_data
from launcher.ds_config import DSConfigError, fill_ds_config, load_ds_config, warmup_steps
from launcher import modeling, rundir
from launcher.optim import describe as describe_groups, param_groups
from launcher.downstream_jobs import DownstreamJobs
from launcher.metrics import MetricsError, MetricsWriter, peak_tflops, step_line, truncate_after, fmt_duration
from launcher.plan import PlanError, StagePlan, max_tokens_per_micro_batch, plan_from_config
from data_pipeline.atomic import write_text
from data_pipeline.errors import DatasetError, SamplePlanError
from model import CausalLM
from model.model import mean_loss
from model.attention import attention_pairs

log = logging.getLogger("growlength")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1, requeue me
EXIT_BAD_INPUT = 2


class StartupError(RuntimeError):
    """A user error found by rank 0 during start-up, raised on every rank (its message is rank 0's)."""


USER_ERRORS = (ConfigError, PlanError, DSConfigError, ckpt.CheckpointError, DatasetError, SamplePlanError,
               FileNotFoundError, MetricsError, StartupError, compiling.CompileError)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON (ZeRO, precision, "
                   "optimizer, scheduler); batch keys and scheduler step counts are filled from the plan")
    p.add_argument("--config", help="run config YAML (presets in launcher/configs/); defaults = tiny CPU demo")
    p.add_argument("--resume", help="'auto' (default), 'none', or a checkpoint / run directory")
    p.add_argument("--resume-force", action="store_true", help="resume even if plan or data differ")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device, for MFU")
    p.add_argument("--run-dir", help="shorthand for run_dir=...")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. growlength.tokens_per_step=8192")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpointing.resume={args.resume}")
    if args.resume_force:
        overrides.append("checkpointing.resume_force=true")
    if args.peak_tflops:
        overrides.append(f"logging.peak_tflops={args.peak_tflops}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class FaultInjection:
    """Test hooks that deliver real signals at exact steps: ``GROWLENGTH_FAULT=kill@7`` SIGKILLs every rank after
    step 7, ``sigusr1@7`` signals rank 0 only (the others must learn of it through the step's collective),
    ``kill-in-save@7`` SIGKILLs every rank inside the save of step 7, after DeepSpeed wrote its files."""

    def __init__(self, rank: int):
        spec = os.environ.get("GROWLENGTH_FAULT", "")
        self.kind, _, step = spec.partition("@")
        self.step = int(step) if step else -1
        self.rank = rank

    def after_step(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sigusr1" and self.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    def in_save(self, step: int) -> None:
        if self.kind == "kill-in-save" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Preemption:
    """SIGTERM/SIGUSR1 (and a first Ctrl-C) set a flag; the loop checkpoints at the next step boundary and exits for
    a requeue. Under the deepspeed runner, the runner's death sets it too: stopping the runner's PID alone leaves
    its ``deepspeed.launcher.launch`` child and the ranks running, so each rank watches its launcher's parent."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handler)
                          for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        self._runner = _deepspeed_runner()

    def restore(self) -> None:
        """Put back the handlers that were there before (main() may run inside another program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT:
            log.warning("interrupted: checkpointing at the next step boundary (Ctrl-C again to stop at once)")
        self.signal = signum

    def poll(self) -> None:
        """Called once per step: notice a deepspeed runner that is gone (one /proc read)."""
        if self._runner is not None and self.signal is None and _parent_of(self._runner[0]) != self._runner[1]:
            log.warning("the deepspeed runner (pid %d) is gone: checkpointing at this step boundary and exiting",
                        self._runner[1])
            self.signal = signal.SIGTERM
            self._runner = None


def _parent_of(pid: int) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _deepspeed_runner() -> tuple[int, int] | None:
    """``(pid of deepspeed.launcher.launch, pid of its parent)`` when that module started this process (Linux)."""
    launch = os.getppid()
    try:
        if b"deepspeed.launcher.launch" not in Path(f"/proc/{launch}/cmdline").read_bytes():
            return None
    except OSError:
        return None
    runner = _parent_of(launch)
    return (launch, runner) if runner else None


@dataclass(frozen=True)
class StepFlags:
    """What every rank agreed on in a step's collective: stop for a requeue, or stop at the time budget."""

    preempted: bool = False
    out_of_time: bool = False


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0                 # optimizer steps completed
    tokens_seen: int = 0
    elapsed_s: float = 0.0        # training wall-clock before this process started
    stage_seconds: dict = field(default_factory=dict)  # stage index -> wall-clock spent in it


def client_state(cfg: RunConfig, plan: StagePlan, data: TrainData, model_config, progress: Progress,
                 loader_state: dict, world: int) -> dict:
    return {"step": progress.step, "stage": plan.stage_at(progress.step).index, "loader": loader_state,
            "tokens_seen": progress.tokens_seen, "elapsed_s": progress.elapsed_s,
            "stage_seconds": progress.stage_seconds, "plan": plan.describe(), "plan_fingerprint": plan.fingerprint(),
            "tokens_per_step": plan.tokens_per_step, "world_size": world, "seed": cfg.seed,
            "data_fingerprint": data.fingerprint, "data_prefix": data.prefix,
            "data_prefix_resolved": str(Path(data.prefix).resolve()), "tokenizer": data.tokenizer_path,
            "tokenizer_resolved": str(Path(data.tokenizer_path).resolve()), "tokenizer_in_run": data.tokenizer_in_run,
            "model": model_config.to_dict(), "config": cfg.to_dict()}


class Trainer:
    """Holds what the loop needs; ``train()`` is the loop."""

    def __init__(self, cfg: RunConfig, plan: StagePlan, data: TrainData, engine, rank: int, world: int,
                 progress: Progress, preemption: Preemption):
        self.cfg, self.plan, self.data, self.engine = cfg, plan, data, engine
        self.rank, self.world, self.progress = rank, world, progress
        self.run_dir = Path(cfg.run_dir)
        self.device = dist.device()
        self.model: CausalLM = engine.module
        self.metrics = MetricsWriter(self.run_dir, rank == 0, cfg.logging.tensorboard, cfg.logging.wandb,
                                     {"config": cfg.to_dict(), "plan": plan.describe(),
                                      "tokens_per_step": plan.tokens_per_step, "world_size": world})
        self.downstream = DownstreamJobs(self.run_dir, cfg.logging.downstream_tasks, cfg.logging.downstream_limit,
                                         rank == 0)
        self.finished = False
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        self.peak = peak_tflops(cfg.logging.peak_tflops, name)
        self.preemption = preemption
        self.faults = FaultInjection(rank)
        self.loader = None
        self.start_time = time.perf_counter()
        self.step_times: list[float] = []
        self.last_loss = float("nan")
        self.last_eval: dict = {}
        self.compiler = compiling.StageCompiler(self.model, cfg.model.compile, self.device,
                                                next(self.model.parameters()).dtype)

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> int:
        plan, p = self.plan, self.progress
        stage = None
        while p.step < plan.total_steps:
            if stage is None or p.step >= stage.last_step:
                t_switch = time.perf_counter()
                # ---- GrowLength stage switch: same engine, new micro-batch, next slice of the stream ----
                previous, stage = stage, plan.stage_at(p.step)
                ds.set_stage_batch(self.engine, stage.micro_batch_size, stage.grad_accum, self.world)
                if self.loader is not None:
                    self.loader.close()  # the finished stage's prefetch thread
                self.loader = self.data.loader(stage, consumed_steps=p.step - stage.first_step)
                batches = iter(self.loader)
                self.step_times = []
                if previous is not None and self.compiler.enabled:
                    log.info("stage %d: %d recompile(s) during training (none expected)", previous.index,
                             self.compiler.recompiles)
                self.compiler.compile_stage(stage.index, stage.micro_batch_size, stage.seq_len)  # before step 1
                switch_s = time.perf_counter() - t_switch
                log.info("stage %d: seq_len %d, micro_batch %d x accum %d x %d ranks = %d tokens/step, "
                         "steps %d-%d (%s; switch %.3fs, %s); attention %s", stage.index, stage.seq_len,
                         stage.micro_batch_size, stage.grad_accum, self.world, plan.tokens_per_step,
                         stage.first_step + 1, stage.last_step, "resumed mid-stage" if p.step > stage.first_step else
                         ("start" if previous is None else f"grown from {previous.seq_len}"), switch_s,
                         self.compiler.describe(stage.index),
                         self.model.attention_kernel(self.device, next(self.model.parameters()).dtype))
                if p.step == stage.first_step:  # a stage that starts here (not a mid-stage resume)
                    self.metrics.write({"kind": "stage", "step": p.step, "stage": stage.index,
                                        "seq_len": stage.seq_len, "micro_batch_size": stage.micro_batch_size,
                                        "grad_accum": stage.grad_accum, "tokens_seen": p.tokens_seen,
                                        "elapsed_s": self.elapsed(), "switch_s": switch_s,
                                        **self.compiler.stage_fields(stage.index)})
            record, flags = self.train_step(stage, batches)
            if p.step % self.cfg.logging.log_interval == 0 or p.step == stage.last_step:
                log.info(step_line(record, self.eta_s(stage)))
            outcome = self.after_step(stage, flags)
            if outcome == "preempted":
                log.warning("preempted: checkpoint at step %d saved; exiting with %d for a requeue",
                            p.step, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if outcome == "out_of_time":
                log.info("wall-clock budget growlength.max_time_s=%g s reached at step %d: stopping",
                         self.cfg.growlength.max_time_s, p.step)
                break
        self.summary()
        self.finished = True
        return 0

    def train_step(self, stage, batches) -> tuple[dict, StepFlags]:
        """One optimizer step over exactly this step's micro-batches; returns its metrics record and flags."""
        t0 = time.perf_counter()
        micro_batches = next(batches)  # [(micro_batch_size, seq_len + 1)] * grad_accum
        data_wait = time.perf_counter() - t0
        lr = self.engine.get_lr()[0]  # the rate this step uses: the scheduler advances inside engine.step()
        losses, pairs = [], 0  # pairs: (query, key) pairs this rank's attention computes (causal, per document)
        for i, mb in enumerate(micro_batches):
            mb, cu_seqlens = mb if self.data.document_masking else (mb, None)  # cu_seqlens stays on the CPU
            pairs += attention_pairs(mb.shape[0], stage.seq_len, cu_seqlens)
            mb = mb.to(self.device, non_blocking=True)
            ds.set_accumulation_boundary(self.engine, i == len(micro_batches) - 1)
            loss = self.engine(mb[:, :-1], labels=mb[:, 1:], cu_seqlens=cu_seqlens)
            self.engine.backward(loss)
            losses.append(loss.detach())
        self.engine.step()  # the update: the last micro-batch was marked as the boundary
        # one collective and one device-to-host copy per step: loss, grad norm (the same on every rank),
        # whether any rank was signalled, and rank 0's clock against the wall-clock budget
        norm = self.engine.get_global_grad_norm()
        self.preemption.poll()
        flags = [float(self.preemption.signal is not None), float(self._past_time_limit()), float(pairs)]
        packed = torch.cat([torch.stack(losses).double().mean().reshape(1),
                            torch.as_tensor(-1.0 if norm is None else norm, dtype=torch.float64,
                                            device=self.device).reshape(1),
                            torch.tensor(flags, dtype=torch.float64, device=self.device)])
        loss_sum, norm_sum, signalled, stop, pairs = dist.all_reduce_sum_tensor(packed)
        dt = time.perf_counter() - t0
        p = self.progress
        p.step += 1
        p.tokens_seen += self.plan.tokens_per_step
        p.stage_seconds[str(stage.index)] = p.stage_seconds.get(str(stage.index), 0.0) + dt
        self.step_times.append(dt)
        tokens, model = self.plan.tokens_per_step, self.model
        tokens_per_s = tokens / dt
        # model FLOPs of the step: the attention it computed (causal, within documents) for tflops and mfu, and
        # PaLM's convention (full T x T) for comparison with papers
        attn_flops, attn_flops_palm = model.attention_flops(round(pairs)), model.attention_flops(tokens * stage.seq_len)
        tflops = (model.matmul_flops_per_token() * tokens + attn_flops) / dt / self.world / 1e12
        tflops_palm = model.flops_per_token(stage.seq_len) * tokens_per_s / self.world / 1e12
        record = {"step": p.step, "stage": stage.index, "seq_len": stage.seq_len,
                  "micro_batch_size": stage.micro_batch_size, "grad_accum": stage.grad_accum,
                  "tokens_per_step": tokens, "tokens_seen": p.tokens_seen,
                  "loss": loss_sum / self.world, "lr": lr,
                  "grad_norm": None if norm is None else norm_sum / self.world,
                  "tokens_per_s": tokens_per_s, "tflops": tflops,
                  "mfu": tflops / self.peak if self.peak else None, "tflops_palm": tflops_palm,
                  "mfu_palm": tflops_palm / self.peak if self.peak else None,
                  "attn_flops": attn_flops, "attn_flops_palm": attn_flops_palm, "elapsed_s": self.elapsed(),
                  "data_wait_s": data_wait}
        self.metrics.write(record)
        self.last_loss = record["loss"]
        self.faults.after_step(p.step)
        return record, StepFlags(preempted=signalled > 0, out_of_time=stop > 0)

    def after_step(self, stage, flags: StepFlags) -> str:
        """What is due after this step (validation, a checkpoint), then doing it; returns "continue",
        "preempted" or "out_of_time"."""
        step, cfg, last = self.progress.step, self.cfg, self.plan.total_steps
        stage_end = step == stage.last_step
        every, eval_every = cfg.checkpointing.interval_steps, cfg.logging.eval_interval
        evaluate = stage_end or bool(eval_every and step % eval_every == 0)
        save = (flags.preempted or flags.out_of_time or step == last or bool(every and step % every == 0)
                or (stage_end and cfg.checkpointing.at_stage_end))
        if evaluate:
            try:
                self.evaluate(stage, stage_end)
            except Exception:
                log.error("validation at step %d failed: saving a checkpoint first, so the steps are kept", step)
                self.save()
                raise
        if save:
            self.save()
        if save and stage_end:  # a background process: training goes on while it evaluates
            self.downstream.start(ckpt.checkpoint_root(self.run_dir) / ckpt.tag_for(step), step)
        # the evaluation or the save may itself have used up the wall-clock budget
        out_of_time = flags.out_of_time or bool((save or evaluate) and step < last and self.out_of_time())
        if out_of_time and not save:
            self.save()
        if out_of_time and not stage_end:
            self.evaluate(stage, stage_end=True)  # the run ends mid-stage: validate where it stopped
        return "preempted" if flags.preempted else "out_of_time" if out_of_time else "continue"

    # ---- around the loop ------------------------------------------------------------------------------------
    def _past_time_limit(self) -> bool:
        limit = self.cfg.growlength.max_time_s
        return self.rank == 0 and limit is not None and self.elapsed() >= limit  # rank 0's clock decides

    def out_of_time(self) -> bool:
        """Whether growlength.max_time_s is used up, by rank 0's clock, agreed by every rank."""
        if self.cfg.growlength.max_time_s is None:
            return False
        return dist.all_reduce_sum([float(self._past_time_limit())])[0] > 0

    def elapsed(self) -> float:
        return self.progress.elapsed_s + time.perf_counter() - self.start_time

    def eta_s(self, stage) -> float:
        """Remaining steps of this stage at its median step time, later stages scaled by FLOPs per token."""
        t = statistics.median(self.step_times)
        per_token = self.model.flops_per_token(stage.seq_len)
        later = sum(s.steps * self.model.flops_per_token(s.seq_len) / per_token
                    for s in self.plan.stages if s.index > stage.index)
        return t * (stage.last_step - self.progress.step + later)

    @torch.no_grad()
    def evaluate(self, stage, stage_end: bool) -> None:
        """Validation loss at the current stage's length and at the final length (plus logging.eval_lengths
        at stage ends), each on whole, untruncated windows of the held-out documents."""
        if not self.data.has_validation:
            return
        lengths = {stage.seq_len, self.plan.final_seq_len}
        if stage_end:
            lengths.update(self.cfg.logging.eval_lengths)
        self.engine.eval()
        record = {"kind": "eval", "step": self.progress.step, "stage": stage.index, "seq_len": stage.seq_len,
                  "tokens_seen": self.progress.tokens_seen, "elapsed_s": self.elapsed()}
        tokens_per_batch = stage.micro_batch_size * stage.seq_len
        for length in sorted(lengths):
            batches = self.data.valid_batches(length, self.cfg.logging.eval_tokens, tokens_per_batch)
            loss_sum, n_tok = dist.all_reduce_sum(list(mean_loss(self.engine, batches, self.device)))
            if n_tok:
                record[f"val_loss_{length}"] = loss_sum / n_tok
                record[f"val_ppl_{length}"] = float(torch.tensor(loss_sum / n_tok).exp())
        self.engine.train()
        self.metrics.write(record)
        self.last_eval = record
        log.info("eval step %d | %s", self.progress.step,
                 " | ".join(f"L={k.split('_')[-1]} loss {v:.3f}" for k, v in record.items() if k.startswith("val_loss")))

    def save(self) -> None:
        root = ckpt.checkpoint_root(self.run_dir)
        tag = ckpt.tag_for(self.progress.step)
        t0 = time.perf_counter()
        ckpt.prepare_dir(root, tag, self.rank)
        dist.barrier()
        self.progress.elapsed_s, self.start_time = self.elapsed(), time.perf_counter()
        state = client_state(self.cfg, self.plan, self.data, self.model.config, self.progress,
                             self.loader.state_dict(), self.world)
        ds.save_checkpoint(self.engine, str(root), tag, {"growlength": state})
        ckpt.save_rng(root / tag, self.rank)
        dist.barrier()
        self.faults.in_save(self.progress.step)
        if self.rank == 0:
            state["files"] = ckpt.file_sizes(root / tag)  # checked before a resume: a torn file is skipped
            ckpt.write_state(root / tag, state)
            ckpt.prune(root, self.cfg.checkpointing.keep_last, keep=self.downstream.busy())
        dist.barrier()
        log.info("checkpoint %s saved (%.1fs)", root / tag, time.perf_counter() - t0)

    def summary(self) -> None:
        p = self.progress
        log.info("done: %d steps, %s tokens in %s; final train loss %.4f%s", p.step, f"{p.tokens_seen:,}",
                 fmt_duration(self.elapsed()), self.last_loss,
                 "".join(f", {k} {v:.4f}" for k, v in self.last_eval.items() if k.startswith("val_loss")))
        for s in self.plan.stages:
            done = min(max(p.step - s.first_step, 0), s.steps)
            tokens = done * self.plan.tokens_per_step
            secs = p.stage_seconds.get(str(s.index), 0.0)
            log.info("  stage %d L=%-5d %6d/%d steps %13s tokens %9s %10s tok/s", s.index, s.seq_len, done, s.steps,
                     f"{tokens:,}", fmt_duration(secs), f"{tokens / secs:,.0f}" if secs else "-")

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        self.downstream.close(wait=self.finished)  # a stopped run ends its jobs; a finished one waits for them
        self.metrics.close()
        self.compiler.close()


def resume(cfg: RunConfig, engine, trainer_state: dict, path: Path, rank: int) -> Progress:
    ds.load_checkpoint(engine, str(path.parent), path.name)
    ckpt.load_rng(path, rank)
    if rank == 0:
        dropped = truncate_after(cfg.run_dir, trainer_state["step"])
        if dropped:
            log.info("dropped %d metrics records written after the checkpoint", dropped)
    return Progress(step=trainer_state["step"], tokens_seen=trainer_state["tokens_seen"],
                    elapsed_s=trainer_state["elapsed_s"], stage_seconds=dict(trainer_state["stage_seconds"]))


def probed_caps(cfg: RunConfig) -> list[int] | None:
    """Per-stage micro-batch token caps from a bench_lengths memory probe, when the config names one."""
    probe = cfg.growlength.micro_batch_probe
    if not probe:
        return None
    if not Path(probe).is_file():
        raise ConfigError(f"growlength.micro_batch_probe {probe}: no such file; make one with "
                          f"python -m evidence.bench_lengths --json {probe}")
    try:
        return [max_tokens_per_micro_batch(probe, int(s["seq_len"])) for s in cfg.growlength.stages]
    except PlanError as e:
        raise ConfigError(f"growlength.micro_batch_probe {probe}: {e}") from e


def claim_run_dir(cfg: RunConfig, run_dir: Path, world: int) -> tuple[rundir.RunLock, Path | None, list[str]]:
    """Rank 0's part of start-up: lock the run directory and choose the checkpoint to resume from."""
    lock = rundir.RunLock(run_dir)
    try:
        resume = cfg.checkpointing.resume
        if resume == "none" and rundir.has_previous_run(run_dir):
            raise rundir.RunDirError(f"--resume none, but run_dir {run_dir} already holds a run (checkpoints or "
                                     f"metrics.jsonl) that this one would overwrite: choose a new run_dir, resume "
                                     f"it (--resume auto), or delete it first")
        path, warnings = ckpt.choose(resume, run_dir, world)
        return lock, path, warnings
    except BaseException:
        lock.release()
        raise


def check_validation(data: TrainData, plan: StagePlan, cfg: RunConfig) -> None:
    """Every length the loop will validate at fits the validation split: found now, not at the first stage end."""
    if not data.has_validation:
        return
    for length in sorted({s.seq_len for s in plan.stages} | set(cfg.logging.eval_lengths)):
        try:
            data.samples.validation.windows(length, 1)
        except (DatasetError, SamplePlanError) as e:
            where = "logging.eval_lengths" if length in cfg.logging.eval_lengths else "a stage's seq_len"
            raise DatasetError(f"{where} {length}: {e}") from e


def start_decision(cfg: RunConfig, run_dir: Path, rank: int, world: int) -> tuple[rundir.RunLock | None, dict]:
    """Rank 0 locks the run directory and chooses the checkpoint; every rank takes its answer (ranks listing a
    shared filesystem could disagree), and a refusal on rank 0 is raised on every rank instead of leaving the others
    waiting at the next collective. Returns rank 0's lock (None elsewhere) and ``{"path", "warnings"}``."""
    lock, decision = None, {"error": None, "path": None, "warnings": []}
    if rank == 0:
        try:
            rundir.check_writable(run_dir)
            lock, path, warnings = claim_run_dir(cfg, run_dir, world)
            decision.update(path=str(path) if path else None, warnings=warnings)
        except USER_ERRORS as e:
            decision["error"] = f"{type(e).__name__}: {e}"
    decision = dist.broadcast_object(decision)
    if decision["error"]:
        if lock is not None:
            lock.release()
        raise StartupError(decision["error"])
    return lock, decision


def run(cfg: RunConfig, ds_config_path: str, rank: int, world: int, preemption: Preemption) -> int:
    run_dir = Path(cfg.run_dir)
    lock, decision = start_decision(cfg, run_dir, rank, world)
    try:
        return _run(cfg, ds_config_path, rank, world, preemption, run_dir, decision)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, ds_config_path: str, rank: int, world: int, preemption: Preemption, run_dir: Path,
         decision: dict) -> int:
    setup_logging(rank, run_dir)
    for warning in decision["warnings"]:
        log.warning("%s", warning)
    resume_from = Path(decision["path"]) if decision["path"] else None
    saved = ckpt.read_state(resume_from) if resume_from else None
    data = prepare_data(cfg, rank, world)
    saved_steps = [s["steps"] for s in saved["plan"]] if saved and cfg.growlength.budget_kind() == "time_share" else None
    user_ds_config = load_ds_config(ds_config_path)
    dtype = (torch.bfloat16 if user_ds_config.get("bf16", {}).get("enabled") else
             torch.float16 if user_ds_config.get("fp16", {}).get("enabled") else torch.float32)
    model_config = modeling.run_model_config(cfg.model, data.tokenizer)
    compiling.check_compiler(cfg.model.compile, dist.device())  # refused here, before the plan and the model
    modeling.deterministic_kernels(model_config, dist.device())
    plan = plan_from_config(cfg.growlength, world, saved_steps=saved_steps, stage_caps=probed_caps(cfg),
                            step_seconds=lambda stages: modeling.probe_step_times(model_config, rank, stages, dtype))
    ds_config = fill_ds_config(user_ds_config, plan,
                               warmup_steps(plan.total_steps, cfg.optimisation.warmup_steps,
                                            cfg.optimisation.warmup_fraction), source=ds_config_path)
    if saved:  # before anything expensive: the checkpoint must fit this run's plan, data, split and model
        current = client_state(cfg, plan, data, model_config, Progress(), {}, world)
        for diff in ckpt.check_compatible(saved, current, resume_from, cfg.checkpointing.resume_force):
            log.warning("resuming despite a difference (--resume-force): %s", diff)
    data.build_index(plan)
    check_validation(data, plan, cfg)
    log.info("GrowLength plan (%s):\n%s", plan.fingerprint(), plan.table())
    if rank == 0:
        data.tokenizer_in_run = rundir.copy_tokenizer(data.tokenizer, run_dir)
    model = modeling.build_model(cfg, model_config)
    log.info("model %s: %.2fM parameters, vocab %d (padded %d), attention %s", cfg.model.init_from_hf or
             cfg.model.preset, model.num_params() / 1e6, model_config.vocab_size, model_config.padded_vocab_size,
             model.config.attention)
    groups = param_groups(model)
    log.info("weight decay %s: %s", user_ds_config.get("optimizer", {}).get("params", {}).get("weight_decay"),
             describe_groups(groups))
    engine = ds.create_engine(model, ds_config, groups)
    progress = Progress()
    if saved:
        progress = resume(cfg, engine, saved, resume_from, rank)
        log.info("resumed from %s at step %d (%s tokens)", resume_from, progress.step, f"{progress.tokens_seen:,}")
    else:
        ds.begin_schedule(engine)
    if rank == 0:
        write_text(run_dir / "ds_config.resolved.json", json.dumps(ds_config, indent=1))
    trainer = Trainer(cfg, plan, data, engine, rank, world, progress, preemption)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    preemption = Preemption()  # first: a signal during start-up is honoured at the first step boundary
    rank, world, _ = ds.init_distributed()
    setup_logging(rank)
    try:
        cfg = build_config(args)
        return run(cfg, args.ds_config, rank, world, preemption)
    except USER_ERRORS as e:
        log.error("%s", e if isinstance(e, StartupError) else f"{type(e).__name__}: {e}")
        return EXIT_BAD_INPUT
    finally:
        ds.close()
        preemption.restore()


if __name__ == "__main__":
    sys.exit(main())
