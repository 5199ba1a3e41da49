"""Our learning-rate schedules (launcher/schedule.py): the pure function at its boundaries against formulas written
out here, the refusals, and a real one-rank run whose logged rate of every step is the hand-computed WSD rate and
whose resume inside the decay continues it exactly."""
import json
import math
from types import SimpleNamespace

import pytest

from launcher import checkpoint as ckpt
from launcher.config import ConfigError, ScheduleConfig, load_config
from launcher.ds_config import DSConfigError, fill_ds_config
from launcher.plan import build_plan
from launcher.schedule import LRSchedule, ScheduleError, resolve

from launching import ZERO2
from runner import steps

PEAK = 1e-3  # ds_configs/zero2.json optimizer.params.lr


def plan(steps_per_stage=(6, 6), tokens_per_step=1024):
    return build_plan([32 * 2 ** i for i in range(len(steps_per_stage))], list(steps_per_stage), tokens_per_step, 1,
                      grad_accum=1, max_tokens_per_micro_batch=None)


def test_wsd_rates_at_the_boundaries():
    s = resolve(ScheduleConfig(type="wsd", warmup=0.1, decay=0.5, decay_shape="linear", min_lr_ratio=0.2),
                plan((10, 10)))
    assert (s.total_tokens, s.warmup_tokens, s.decay_start) == (20480, 2048, 10240)
    # warmup: 2 steps, the first at half the peak
    assert [s.factor(k) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    # stable until token 10240 (step 10), then linear from 1 to 0.2 over 10 steps
    assert s.factor(9) == 1.0 and s.factor(10) == 1.0
    assert s.factor(15) == pytest.approx(0.2 + 0.8 * 0.5)
    assert s.factor(19) == pytest.approx(0.2 + 0.8 * 0.1)
    assert s.factor(20) == pytest.approx(0.2)


@pytest.mark.parametrize("shape, f", [("linear", lambda q: 1 - q),
                                      ("cosine", lambda q: (1 + math.cos(math.pi * q)) / 2),
                                      ("1-sqrt", lambda q: 1 - q ** 0.5)])
def test_decay_shapes(shape, f):
    s = LRSchedule("wsd", 100, 1000, 0, 600, shape, 0.0)
    for k in range(6, 11):
        assert s.factor(k) == pytest.approx(f((k * 100 - 600) / 400), abs=1e-12), k


def test_cosine_and_constant():
    cos = resolve(ScheduleConfig(type="cosine", warmup=0.25, min_lr_ratio=0.1), plan((4, 4)))
    assert cos.decay_start == cos.warmup_tokens == 2048
    assert cos.factor(1) == 1.0 and cos.factor(5) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)
    const = resolve(ScheduleConfig(type="constant", warmup=0.25), plan((4, 4)))
    assert [const.factor(k) for k in range(8)] == [0.5] + [1.0] * 7


def test_decay_from_a_stage_switch():
    s = resolve(ScheduleConfig(type="wsd", warmup=0.0, decay=0.9, decay_from_stage=2), plan((5, 3, 2)))
    assert s.decay_start == 8 * 1024  # stage 2's first step; decay is ignored
    assert s.factor(7) == 1.0 and s.factor(9) == pytest.approx(0.5)


def test_refusals():
    with pytest.raises(ScheduleError, match="decay_from_stage is 2 but the plan has 2 stages"):
        resolve(ScheduleConfig(type="wsd", decay_from_stage=2), plan())
    with pytest.raises(ScheduleError, match="inside the warmup"):
        resolve(ScheduleConfig(type="wsd", warmup=0.5, decay=0.6), plan())
    with pytest.raises(ConfigError, match="schedule.decay_shape must be"):
        ScheduleConfig(decay_shape="exp")
    with pytest.raises(ConfigError, match="set optimisation.warmup_steps: null"):
        load_config(None, ["schedule.type=wsd", "optimisation.warmup_steps=3"])
    ds = json.loads(ZERO2.read_text())
    with pytest.raises(DSConfigError, match="remove the scheduler section from the JSON, or set schedule.type"):
        fill_ds_config(ds, plan(), 1, schedule_type="wsd")
    del ds["scheduler"]
    assert "scheduler" not in fill_ds_config(ds, plan(), 1, schedule_type="wsd")
    assert resolve(SimpleNamespace(type="ds_config"), plan()) is None


# a real run: 2 stages of 6 steps at 1024 tokens/step; warmup 3 steps, stable, 1-sqrt decay from stage 1 to 0.1
RUN = ["growlength.stages=[{seq_len: 32, tokens: 6144}, {seq_len: 64, tokens: 6144}]", "schedule.type=wsd",
       "schedule.warmup=0.25", "schedule.decay_from_stage=1", "schedule.decay_shape=1-sqrt",
       "schedule.min_lr_ratio=0.1", "checkpointing.interval_steps=4", "checkpointing.keep_last=10"]


def hand_lr(k):
    """The rate of step k (1-based): 12 steps; warmup k/3 of the peak; from step 7, 1-sqrt over steps 7..13."""
    if k <= 3:
        return PEAK * k / 3
    if k <= 6:
        return PEAK
    return PEAK * (0.1 + 0.9 * (1 - ((k - 7) / 6) ** 0.5))


@pytest.fixture(scope="module")
def no_scheduler(tmp_path_factory):
    cfg = json.loads(ZERO2.read_text())
    del cfg["scheduler"]
    cfg["bf16"] = {"enabled": False}
    path = tmp_path_factory.mktemp("ds") / "zero2_own_schedule.json"
    path.write_text(json.dumps(cfg))
    return path


def test_logged_lr_of_every_step_and_resume_inside_the_decay(run, no_scheduler, tmp_path):
    code, out = run(*RUN, ds_config=no_scheduler)
    assert code == 0, out[-3000:]
    assert "LR schedule wsd: warmup 3,072 tokens (3 steps), 1-sqrt decay from 6,144 tokens (after step 6) to 0.1 x peak at 12,288" in out
    full = steps(run.run_dir)
    assert sorted(full) == list(range(1, 13))
    for k, r in full.items():
        assert r["lr"] == pytest.approx(hand_lr(k), rel=1e-12, abs=0), k
    # resume from step 8's checkpoint, in another run directory: steps 9-12 again, the same rates and losses
    start = ckpt.resolve_resume("auto", run.run_dir).parent / "step_00000008"
    assert start.is_dir()
    second = tmp_path / "again"
    code, out = run(*RUN, f"checkpointing.resume={start}", ds_config=no_scheduler, run_dir=second)
    assert code == 0, out[-3000:]
    again = steps(second)
    assert sorted(again) == [9, 10, 11, 12]
    for k in again:
        assert (again[k]["lr"], again[k]["loss"]) == (full[k]["lr"], full[k]["loss"]), k


def test_resume_with_another_schedule_is_refused(run, no_scheduler):
    stages = "growlength.stages=[{seq_len: 32, tokens: 4096}]"
    code, out = run(stages, "schedule.type=constant", ds_config=no_scheduler)
    assert code == 0, out[-3000:]
    code, out = run(stages, "schedule.type=cosine", ds_config=no_scheduler)
    want = "schedule.type: 'constant' -> 'cosine' (moves the learning rate mid-run"
    assert code == 2 and want in out, out[-3000:]
