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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from launcher import checkpoint as ckpt
from launcher import compile as compiling
from launcher import distributed as dist
from launcher import engine as ds
from launcher import modeling, rundir
from launcher.config import RunConfig, load_config
from launcher.data import TrainData, prepare_data
from launcher.ds_config import fill_ds_config, load_ds_config, warmup_steps
from launcher import schedule as lr_schedules
from launcher.faults import FaultInjection
from launcher.metrics import MetricsWriter, eta_seconds, peak_tflops, step_line, step_throughput, summary_lines
from launcher.optim import describe as describe_groups, param_groups
from launcher.downstream_jobs import DownstreamJobs
from launcher.plan import StagePlan, plan_from_config
from launcher.signals import EXIT_PREEMPTED, Preemption
from launcher.startup import StartupError, check_validation, probed_caps, resume, setup_logging, start_decision
from data_pipeline.atomic import write_text
from data_pipeline.errors import UserError
from model import CausalLM
from model.model import mean_loss
from model.attention import attention_pairs

log = logging.getLogger("growlength")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm: stopped before the step was logged or saved


class TrainingDiverged(RuntimeError):
    """A step whose loss or gradient norm is not finite; the run stops before logging or saving it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON (ZeRO, precision, "
                   "optimizer, scheduler); batch keys and scheduler step counts are filled from the plan")
    p.add_argument("--config", help="run config YAML (presets in launcher/configs/); defaults = tiny CPU demo")
    p.add_argument("--resume", help="'auto' (default), 'none', or a checkpoint / run directory")
    p.add_argument("--resume-force", action="store_true", help="resume even if plan or data differ")
    p.add_argument("--start-over", action="store_true", help="move the run that run_dir holds aside to "
                   "RUN_DIR.old-TIMESTAMP and start this one there")
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
    if args.start_over:
        overrides.append("checkpointing.start_over=true")
    if args.peak_tflops:
        overrides.append(f"logging.peak_tflops={args.peak_tflops}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


@dataclass(frozen=True)
class StepFlags:
    """What every rank agreed on in a step's collective: stop for a requeue, or stop at the time budget."""

    preempted: bool = False
    out_of_time: bool = False


class Trainer:
    """Holds what the loop needs; ``train()`` is the loop."""

    def __init__(self, cfg: RunConfig, plan: StagePlan, data: TrainData, engine, rank: int, world: int,
                 progress: ckpt.Progress, preemption: Preemption, clock: Callable[[], float] = time.perf_counter):
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
        self.clock = clock  # seconds; every wall-clock figure and the max_time_s decision read it
        self.start_time = clock()
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
                t_switch = self.clock()
                # ---- GrowLength stage switch: same engine, new micro-batch, next slice of the stream ----
                previous, stage = stage, plan.stage_at(p.step)
                self.data.check_files(f"at the switch to stage {stage.index}")
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
                switch_s = self.clock() - t_switch
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
                log.info(step_line(record, eta_seconds(self.model, self.plan, stage, p.step, self.step_times)))
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
        t0 = self.clock()
        micro_batches = next(batches)  # [(micro_batch_size, seq_len + 1)] * grad_accum
        data_wait = self.clock() - t0
        lr = self.engine.get_lr()[0]  # the rate this step uses: the scheduler advances inside engine.step()
        losses, z_terms, pairs = [], [], 0  # pairs: (query, key) pairs this rank's attention computes (causal, per document)
        for i, mb in enumerate(micro_batches):
            mb, cu_seqlens = mb if self.data.document_masking else (mb, None)  # cu_seqlens stays on the CPU
            pairs += attention_pairs(mb.shape[0], stage.seq_len, cu_seqlens)
            mb = mb.to(self.device, non_blocking=True)
            ds.set_accumulation_boundary(self.engine, i == len(micro_batches) - 1)
            loss = self.faults.poison(self.progress.step + 1,
                                      self.engine(mb[:, :-1], labels=mb[:, 1:], cu_seqlens=cu_seqlens))
            self.engine.backward(loss)
            losses.append(loss.detach())
            if self.model.config.z_loss:  # the penalty inside the loss, logged apart from the cross-entropy
                z_terms.append(self.model.last_z_loss)
        self.engine.step()  # the update: the last micro-batch was marked as the boundary
        # one collective and one device-to-host copy per step: loss, grad norm (the same on every rank),
        # whether any rank was signalled, and rank 0's clock against the wall-clock budget
        norm = self.engine.get_global_grad_norm()
        self.preemption.poll()
        flags = [float(self.preemption.signal is not None), float(self._past_time_limit()), float(pairs)]
        z_mean = torch.stack(z_terms).double().mean() if z_terms else torch.zeros((), dtype=torch.float64,
                                                                                  device=self.device)
        packed = torch.cat([torch.stack(losses).double().mean().reshape(1), z_mean.reshape(1),
                            torch.as_tensor(-1.0 if norm is None else norm, dtype=torch.float64,
                                            device=self.device).reshape(1),
                            torch.tensor(flags, dtype=torch.float64, device=self.device)])
        loss_sum, z_sum, norm_sum, signalled, stop, pairs = dist.all_reduce_sum_tensor(packed)
        self.check_finite(loss_sum / self.world, None if norm is None else norm_sum / self.world)
        dt = self.clock() - t0
        p = self.progress
        p.step += 1
        p.tokens_seen += self.plan.tokens_per_step
        p.stage_seconds[str(stage.index)] = p.stage_seconds.get(str(stage.index), 0.0) + dt
        self.step_times.append(dt)
        record = {"step": p.step, "stage": stage.index, "seq_len": stage.seq_len,
                  "micro_batch_size": stage.micro_batch_size, "grad_accum": stage.grad_accum,
                  "tokens_per_step": self.plan.tokens_per_step, "tokens_seen": p.tokens_seen,
                  "loss": (loss_sum - z_sum) / self.world, "lr": lr,
                  **({"z_loss": z_sum / self.world} if z_terms else {}),
                  "grad_norm": None if norm is None else norm_sum / self.world,
                  **step_throughput(self.model, self.plan.tokens_per_step, stage.seq_len, round(pairs), dt,
                                    self.world, self.peak),
                  "elapsed_s": self.elapsed(), "data_wait_s": data_wait}
        self.metrics.write(record)
        self.last_loss = record["loss"]
        self.faults.after_step(p.step)
        return record, StepFlags(preempted=signalled > 0, out_of_time=stop > 0)

    def check_finite(self, loss: float, grad_norm: float | None) -> None:
        """Stop at a non-finite loss or gradient norm (the same on every rank: both were all-reduced), before the
        step is logged or saved: no checkpoint ever holds NaN weights. An fp16 overflow that DeepSpeed's loss
        scaler skipped is not a divergence."""
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and ds.step_applied(self.engine)
        if math.isfinite(loss) and not bad_norm:
            return
        step = self.progress.step + 1
        raise TrainingDiverged(
            f"step {step}: loss {loss}, gradient norm {grad_norm}: training stopped before saving it; the newest "
            f"checkpoint in {ckpt.checkpoint_root(self.run_dir)} (step {self.progress.step} or earlier) holds the "
            f"last finite weights: resume from it with a lower learning rate or more warmup, or check the data "
            f"of step {step}")

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
        return self.progress.elapsed_s + self.clock() - self.start_time

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
        self.data.check_files(f"before the checkpoint of step {self.progress.step}")
        t0 = self.clock()
        ckpt.prepare_dir(root, tag, self.rank)
        dist.barrier()
        self.progress.elapsed_s, self.start_time = self.elapsed(), self.clock()
        state = ckpt.run_state(self.cfg, self.plan, self.data, self.model.config, self.progress,
                               self.loader.state_dict(), self.world)
        with ckpt.save_errors(root / tag):
            ds.save_checkpoint(self.engine, str(root), tag)
            ckpt.save_rng(root / tag, self.rank)
        dist.barrier()
        self.faults.in_save(self.progress.step)
        if self.rank == 0:
            state.files = ckpt.file_sizes(root / tag)  # checked before a resume: a torn file is skipped
            state.sha256 = ckpt.file_digests(root / tag)  # and so is a corrupted one of the right size
            with ckpt.save_errors(root / tag):
                ckpt.write_state(root / tag, state)
            ckpt.prune(root, self.cfg.checkpointing.keep_last, keep=self.downstream.busy())
        dist.barrier()
        log.info("checkpoint %s saved (%.1fs)", root / tag, self.clock() - t0)

    def summary(self) -> None:
        for line in summary_lines(self.plan, self.progress, self.elapsed(), self.last_loss, self.last_eval):
            log.info("%s", line)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        self.downstream.close(wait=self.finished)  # a stopped run ends its jobs; a finished one waits for them
        self.metrics.close()
        self.compiler.close()


def run(cfg: RunConfig, ds_config_path: str, rank: int, world: int, preemption: Preemption,
        clock: Callable[[], float] = time.perf_counter) -> int:
    run_dir = Path(cfg.run_dir)
    lock, decision = start_decision(cfg, run_dir, rank, world)
    try:
        return _run(cfg, ds_config_path, rank, world, preemption, run_dir, decision, clock)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, ds_config_path: str, rank: int, world: int, preemption: Preemption, run_dir: Path,
         decision: dict, clock: Callable[[], float]) -> int:
    setup_logging(rank, run_dir)
    for warning in decision["warnings"]:
        log.warning("%s", warning)
    resume_from = Path(decision["path"]) if decision["path"] else None
    saved = ckpt.read_state(resume_from) if resume_from else None
    data = prepare_data(cfg, rank, world)
    saved_steps = [s["steps"] for s in saved.plan] if saved and cfg.growlength.budget_kind() == "time_share" else None
    user_ds_config = load_ds_config(ds_config_path)
    dtype = (torch.bfloat16 if user_ds_config.get("bf16", {}).get("enabled") else
             torch.float16 if user_ds_config.get("fp16", {}).get("enabled") else torch.float32)
    model_config = modeling.run_model_config(cfg.model, data.tokenizer, saved.model if saved else None)
    compiling.check_compiler(cfg.model.compile, dist.device())  # refused here, before the plan and the model
    modeling.deterministic_kernels(model_config, dist.device())
    plan = plan_from_config(cfg.growlength, world, saved_steps=saved_steps, stage_caps=probed_caps(cfg),
                            step_seconds=lambda stages: modeling.probe_step_times(model_config, rank, stages, dtype))
    ds_config = fill_ds_config(user_ds_config, plan,
                               warmup_steps(plan.total_steps, cfg.optimisation.warmup_steps,
                                            cfg.optimisation.warmup_fraction), source=ds_config_path,
                               schedule_type=cfg.schedule.type)
    lr_schedule = lr_schedules.resolve(cfg.schedule, plan)
    if saved:  # before anything expensive: the checkpoint must fit this run's plan, data, split and model
        current = ckpt.run_state(cfg, plan, data, model_config, ckpt.Progress(), {}, world)
        for diff in ckpt.check_compatible(saved, current, resume_from, cfg.checkpointing.resume_force):
            log.warning("resuming despite a difference (--resume-force): %s", diff)
    data.build_index(plan)
    check_validation(data, plan, cfg)
    log.info("GrowLength plan (%s):\n%s", plan.fingerprint(), plan.table())
    if lr_schedule is not None:
        log.info("%s", lr_schedule.summary())
    if rank == 0:
        data.tokenizer_in_run = rundir.copy_tokenizer(data.tokenizer, run_dir)
    model = modeling.build_model(cfg, model_config, resuming=saved is not None)
    log.info("model %s: %.2fM parameters, vocab %d (padded %d), attention %s", cfg.model.init_from_hf or
             cfg.model.preset, model.num_params() / 1e6, model_config.vocab_size, model_config.padded_vocab_size,
             model.config.attention)
    groups = param_groups(model)
    log.info("weight decay %s: %s", user_ds_config.get("optimizer", {}).get("params", {}).get("weight_decay"),
             describe_groups(groups))
    engine = ds.create_engine(model, ds_config, groups, lr_schedule)
    progress = ckpt.Progress()
    if saved:
        progress = resume(cfg, engine, saved, resume_from, rank)
        log.info("resumed from %s at step %d (%s tokens)", resume_from, progress.step, f"{progress.tokens_seen:,}")
    else:
        ds.begin_schedule(engine)
    if rank == 0:
        write_text(run_dir / "ds_config.resolved.json", json.dumps(ds_config, indent=1))
    trainer = Trainer(cfg, plan, data, engine, rank, world, progress, preemption, clock)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv=None, clock: Callable[[], float] = time.perf_counter) -> int:
    """Parse, build, train, close: the process's exit code. ``clock`` (seconds) times the run: its steps, its
    records and growlength.max_time_s; tests give one that does not depend on how busy the machine is."""
    args = parse_args(argv)
    preemption = Preemption()  # first: a signal during start-up is honoured at the first step boundary
    rank, world, _ = ds.init_distributed()
    setup_logging(rank)
    try:
        cfg = build_config(args)
        return run(cfg, args.ds_config, rank, world, preemption, clock)
    except UserError as e:
        log.error("%s", e if isinstance(e, StartupError) else f"{type(e).__name__}: {e}")
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        log.error("training diverged at %s", e)
        return EXIT_DIVERGED
    finally:
        ds.close()
        preemption.restore()


if __name__ == "__main__":
    sys.exit(main())
