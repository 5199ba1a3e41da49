"""The GrowLength stage plan: pure batch arithmetic, no torch.

A plan is a list of stages, each a sequence length with a share of the run, at a `tokens_per_step` (global, per
optimizer step) that is the same in every stage. Per stage::

    tokens_per_step == micro_batch_size * seq_len * grad_accum * world_size

A plan that cannot keep this exact is refused before anything starts, with the equation.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.errors import UserError


class PlanError(UserError):
    """A stage plan that cannot be trained as stated; the message says which field and how to fix it."""


@dataclass(frozen=True)
class Stage:
    """One resolved GrowLength stage."""

    index: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    first_step: int  # global optimizer step (0-based) at which the stage starts

    @property
    def last_step(self) -> int:
        """Global step index one past the stage's last step."""
        return self.first_step + self.steps

    def tokens(self, tokens_per_step: int) -> int:
        return self.steps * tokens_per_step

    def num_samples(self, tokens_per_step: int) -> int:
        """Samples of ``seq_len + 1`` tokens the stage consumes (whole stream windows)."""
        return self.tokens(tokens_per_step) // self.seq_len


@dataclass(frozen=True)
class StagePlan:
    tokens_per_step: int
    world_size: int
    stages: tuple[Stage, ...]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].last_step

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    @property
    def final_seq_len(self) -> int:
        return self.stages[-1].seq_len

    def stage_at(self, step: int) -> Stage:
        """The stage that trains global step ``step`` (0-based); the last stage for ``step >= total_steps``."""
        for stage in self.stages:
            if step < stage.last_step:
                return stage
        return self.stages[-1]

    def data_stages(self) -> list[tuple[int, int]]:
        """``[(seq_len, tokens)]`` per stage, the form the data pipeline's sample index takes."""
        return [(s.seq_len, s.tokens(self.tokens_per_step)) for s in self.stages]

    def fingerprint(self) -> str:
        """A hash of everything that decides which tokens each step sees; stored in checkpoints."""
        blob = json.dumps({"tokens_per_step": self.tokens_per_step, "world_size": self.world_size,
                           "stages": [asdict(s) for s in self.stages]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> list[dict]:
        """One dict per stage, for the start-up table and for checkpoints."""
        return [dict(asdict(s), tokens=s.tokens(self.tokens_per_step),
                     share=s.steps / self.total_steps) for s in self.stages]

    def table(self) -> str:
        """The resolved plan as a fixed-width table, printed at start-up."""
        head = f"{'stage':>5} {'seq_len':>7} {'micro_bs':>8} {'accum':>5} {'steps':>7} {'first':>7} {'tokens':>13} {'share':>6}"
        rows = [head, "-" * len(head)]
        for d in self.describe():
            rows.append(f"{d['index']:>5} {d['seq_len']:>7} {d['micro_batch_size']:>8} {d['grad_accum']:>5} "
                        f"{d['steps']:>7} {d['first_step']:>7} {d['tokens']:>13,} {d['share']:>6.1%}")
        rows.append(f"tokens_per_step {self.tokens_per_step:,} x {self.total_steps} steps = "
                    f"{self.total_tokens:,} tokens on {self.world_size} rank(s)")
        return "\n".join(rows)


def micro_batch_for(seq_len: int, tokens_per_step: int, world_size: int, grad_accum: int | None,
                    max_tokens_per_micro_batch: int | None, where: str) -> tuple[int, int]:
    """``(micro_batch_size, grad_accum)`` keeping ``tokens_per_step`` exact at ``seq_len``.

    With a fixed ``grad_accum`` the micro-batch follows from the equation. With ``grad_accum=None`` the
    smallest accumulation is chosen whose micro-batch fits ``max_tokens_per_micro_batch`` (long stages then
    accumulate more instead of growing the micro-batch past what fits in memory).
    """
    per_step_samples, rem = divmod(tokens_per_step, seq_len)
    if rem:
        raise PlanError(f"{where}: tokens_per_step {tokens_per_step} is not a multiple of seq_len {seq_len}; "
                        f"pick tokens_per_step as a multiple of every stage's seq_len "
                        f"(e.g. {tokens_per_step - rem + seq_len})")
    if grad_accum is not None:
        mb, rem = divmod(per_step_samples, grad_accum * world_size)
        if rem or mb == 0:
            raise PlanError(f"{where}: tokens_per_step {tokens_per_step} != micro_batch {per_step_samples / (grad_accum * world_size):g}"
                            f" * seq_len {seq_len} * accum {grad_accum} * ranks {world_size}; "
                            f"the micro-batch must be a whole number >= 1: change tokens_per_step, grad_accum or ranks")
        if max_tokens_per_micro_batch and mb * seq_len > max_tokens_per_micro_batch:
            raise PlanError(f"{where}: micro_batch {mb} * seq_len {seq_len} = {mb * seq_len} tokens exceeds "
                            f"max_tokens_per_micro_batch {max_tokens_per_micro_batch}; raise grad_accum "
                            f"or leave it unset so the launcher chooses it per stage")
        return mb, grad_accum
    cap = max_tokens_per_micro_batch or tokens_per_step
    for accum in range(1, per_step_samples + 1):
        mb, rem = divmod(per_step_samples, accum * world_size)
        if mb == 0:
            break
        if not rem and mb * seq_len <= cap:
            return mb, accum
    raise PlanError(f"{where}: no whole micro-batch keeps tokens_per_step {tokens_per_step} == micro_batch * "
                    f"seq_len {seq_len} * accum * ranks {world_size} with micro_batch * seq_len <= "
                    f"{cap}; make tokens_per_step a multiple of seq_len * ranks = {seq_len * world_size}")


def build_plan(seq_lens: list[int], steps: list[int], tokens_per_step: int, world_size: int,
               grad_accum: int | None = 1, max_tokens_per_micro_batch: int | list | None = None) -> StagePlan:
    """Resolve stage lengths and step counts into a :class:`StagePlan`, or raise :class:`PlanError`.

    ``max_tokens_per_micro_batch`` is one cap for every stage or a list with one per stage (from a memory probe).

    Every problem found is collected and reported at once, so a user fixes the plan in one pass.
    """
    errors: list[str] = []
    if not seq_lens:
        raise PlanError("growlength.stages is empty: give at least one stage, e.g. [{seq_len: 128, share: 1.0}]")
    if len(steps) != len(seq_lens):
        raise PlanError(f"internal: {len(seq_lens)} stages but {len(steps)} step counts")
    if tokens_per_step <= 0:
        errors.append(f"growlength.tokens_per_step must be positive, got {tokens_per_step}")
    if world_size <= 0:
        errors.append(f"world size must be positive, got {world_size}")
    for i, (a, b) in enumerate(zip(seq_lens, seq_lens[1:])):
        if b <= a:
            errors.append(f"growlength.stages[{i + 1}].seq_len {b} must be greater than stages[{i}].seq_len {a}: "
                          f"GrowLength stages grow; list them shortest first")
    for i, n in enumerate(seq_lens):
        if n <= 0:
            errors.append(f"growlength.stages[{i}].seq_len must be positive, got {n}")
    for i, n in enumerate(steps):
        if n <= 0:
            errors.append(f"growlength.stages[{i}] gets {n} optimizer steps; every stage needs at least one: "
                          f"raise its budget or the total, or lower tokens_per_step")
    if errors:
        raise PlanError("invalid GrowLength plan:\n  " + "\n  ".join(errors))
    caps = (list(max_tokens_per_micro_batch) if isinstance(max_tokens_per_micro_batch, (list, tuple))
            else [max_tokens_per_micro_batch] * len(seq_lens))
    stages, first = [], 0
    for i, (seq_len, n_steps) in enumerate(zip(seq_lens, steps)):
        try:
            mb, accum = micro_batch_for(seq_len, tokens_per_step, world_size, grad_accum, caps[i],
                                        f"growlength.stages[{i}]")
        except PlanError as e:
            errors.append(str(e))
            continue
        stages.append(Stage(index=i, seq_len=seq_len, micro_batch_size=mb, grad_accum=accum,
                            steps=n_steps, first_step=first))
        first += n_steps
    if errors:
        raise PlanError("invalid GrowLength plan:\n  " + "\n  ".join(errors))
    return StagePlan(tokens_per_step=tokens_per_step, world_size=world_size, stages=tuple(stages))


def steps_from_tokens(tokens: list[int], tokens_per_step: int) -> list[int]:
    """Whole optimizer steps per stage for absolute token budgets; a budget must be a whole number of steps."""
    out, errors = [], []
    for i, t in enumerate(tokens):
        n, rem = divmod(t, tokens_per_step)
        if rem:
            errors.append(f"growlength.stages[{i}].tokens {t} is not a whole number of steps of tokens_per_step "
                          f"{tokens_per_step} ({t / tokens_per_step:.3f} steps); use {n * tokens_per_step} or "
                          f"{(n + 1) * tokens_per_step}")
        out.append(n)
    if errors:
        raise PlanError("invalid GrowLength plan:\n  " + "\n  ".join(errors))
    return out


def steps_from_shares(shares: list[float], total_steps: int) -> list[int]:
    """Split ``total_steps`` by ``shares`` (summing to 1) into whole steps; rounding goes to the largest remainders."""
    if abs(sum(shares) - 1.0) > 1e-6:
        raise PlanError(f"growlength.stages shares sum to {sum(shares):g}, not 1: scale them so they add up to 1")
    raw = [s * total_steps for s in shares]
    steps = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - steps[i], reverse=True)
    for i in order[: total_steps - sum(steps)]:
        steps[i] += 1
    return steps


def steps_from_time_shares(shares: list[float], step_seconds: list[float], total_steps: int | None = None,
                           total_seconds: float | None = None) -> list[int]:
    """Steps per stage so that stage k takes ``shares[k]`` of the wall-clock (the paper's section 4.5 ratios).

    ``step_seconds[k]`` is the measured (or estimated) time of one optimizer step at stage k's length. Either the
    total wall-clock (``total_seconds``) or the total number of steps is fixed.
    """
    if abs(sum(shares) - 1.0) > 1e-6:
        raise PlanError(f"growlength.stages time shares sum to {sum(shares):g}, not 1: scale them to add up to 1")
    if total_seconds is not None:
        return [max(1, round(s * total_seconds / t)) for s, t in zip(shares, step_seconds)]
    assert total_steps is not None
    # time t_k = share_k * T; steps_k = t_k / step_seconds_k and sum(steps_k) = total_steps fixes T.
    per_unit = [s / t for s, t in zip(shares, step_seconds)]
    return steps_from_shares([p / sum(per_unit) for p in per_unit], total_steps)


def plan_from_config(g, world_size: int, step_seconds=None, saved_steps: list[int] | None = None,
                     stage_caps: list[int] | None = None) -> StagePlan:
    """Resolve a ``GrowLengthConfig`` into a :class:`StagePlan`.

    Budgets: ``tokens`` (absolute, whole steps), ``share`` (of ``total_tokens``) or ``time_share`` (of the
    wall-clock, resolved with ``step_seconds(stages) -> [seconds per optimizer step]``, a measured probe of each
    stage's shape: its ``seq_len``, ``micro_batch_size`` and ``grad_accum`` as the plan will run it).
    ``saved_steps`` (from a checkpoint) replaces the time-share resolution so a resumed run repeats the
    switch steps it actually took. Each stage's cap on tokens per micro-batch is its own
    ``max_tokens_per_micro_batch`` if the stage gives one, else ``stage_caps[i]`` (from a memory probe), else the
    section's single ``max_tokens_per_micro_batch``.
    """
    seq_lens = [int(s["seq_len"]) for s in g.stages]
    caps = [s.get("max_tokens_per_micro_batch") or (stage_caps[i] if stage_caps is not None else None)
            or g.max_tokens_per_micro_batch for i, s in enumerate(g.stages)]
    kind = g.budget_kind()
    if kind == "tokens":
        steps = steps_from_tokens([int(s["tokens"]) for s in g.stages], g.tokens_per_step)
    else:
        total_steps, rem = divmod(int(g.total_tokens), g.tokens_per_step)
        if rem:
            raise PlanError(f"growlength.total_tokens {g.total_tokens} is not a whole number of steps of "
                            f"tokens_per_step {g.tokens_per_step}; use {total_steps * g.tokens_per_step} or "
                            f"{(total_steps + 1) * g.tokens_per_step}")
        shares = [float(s[kind]) for s in g.stages]
        if saved_steps is not None:
            steps = list(saved_steps)
        elif kind == "share":
            steps = steps_from_shares(shares, total_steps)
        else:
            if step_seconds is None:
                raise PlanError("growlength.stages give time_share but no step-time probe is available")
            # the probe times the shapes the plan will run: the same rule and caps (one step per stage here)
            shapes = build_plan(seq_lens, [1] * len(seq_lens), g.tokens_per_step, world_size, g.grad_accum, caps)
            steps = steps_from_time_shares(shares, step_seconds(list(shapes.stages)), total_steps=total_steps)
    return build_plan(seq_lens, steps, g.tokens_per_step, world_size, g.grad_accum, caps)


# ---- a memory probe (an evidence.bench_lengths JSON) as per-stage micro-batch caps ------------------------------
def load_probe(probe: dict | str | Path) -> dict:
    if isinstance(probe, dict):
        return probe
    try:
        return json.loads(Path(probe).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{probe}: not a readable bench_lengths JSON ({e}); write one with "
                        f"python -m evidence.bench_lengths --json OUT") from None


def max_tokens_per_micro_batch(probe: dict | str | Path, seq_len: int, safety: float = 0.9) -> int:
    """Tokens per micro-batch (per rank) that fit at ``seq_len``, from a bench_lengths report, times ``safety``.

    A length that was not probed takes the value of the next longer probed length (memory per token grows with
    length, so that is a safe bound); a length longer than every probed one is refused."""
    lengths = load_probe(probe).get("lengths")
    if not isinstance(lengths, list) or not all(isinstance(r, dict) and "seq_len" in r for r in lengths):
        raise PlanError(f"{probe}: not a bench_lengths JSON (no 'lengths' rows with seq_len); write one with "
                        f"python -m evidence.bench_lengths --json OUT")
    rows = sorted((r for r in lengths if r.get("max_tokens_per_batch")), key=lambda r: r["seq_len"])
    longer = [r for r in rows if r["seq_len"] >= seq_len]
    if not longer:
        raise PlanError(f"seq_len {seq_len} is longer than every length in the probe "
                        f"({[r['seq_len'] for r in rows]}); rerun bench_lengths with --lengths up to {seq_len}")
    fit = longer[0]["max_tokens_per_batch"]
    return max(seq_len, int(fit * safety) // seq_len * seq_len)


def stage_micro_batches(probe: dict | str | Path, seq_lens: list[int], tokens_per_step: int, world_size: int,
                        safety: float = 0.9) -> dict[int, tuple[int, int]]:
    """``{seq_len: (micro_batch_size, grad_accum)}`` per stage: the smallest accumulation whose micro-batch fits
    the probe at that length, keeping ``tokens_per_step`` exact (launcher.plan.micro_batch_for's rule)."""
    return {L: micro_batch_for(L, tokens_per_step, world_size, None,
                               max_tokens_per_micro_batch(probe, L, safety), f"stage seq_len {L}")
            for L in seq_lens}
