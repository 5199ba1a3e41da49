"""Stage-plan arithmetic at its boundaries: exact tokens per step, the equation in every refusal."""
from dataclasses import fields, replace

import pytest

from launcher.plan import (PlanError, build_plan, micro_batch_for, plan_from_config, steps_from_shares,
                           steps_from_time_shares, steps_from_tokens)
from launcher.config import GrowLengthConfig


def test_micro_batch_keeps_tokens_per_step_constant():
    plan = build_plan([128, 256, 512, 1024], [10, 10, 10, 10], tokens_per_step=65536, world_size=2, grad_accum=4)
    assert [s.micro_batch_size for s in plan.stages] == [64, 32, 16, 8]
    for s in plan.stages:
        assert s.micro_batch_size * s.seq_len * s.grad_accum * plan.world_size == 65536
    assert [s.first_step for s in plan.stages] == [0, 10, 20, 30]
    assert plan.total_steps == 40 and plan.total_tokens == 40 * 65536


def test_refusal_shows_the_equation():
    with pytest.raises(PlanError, match=r"tokens_per_step 65536 != micro_batch 2.66667 \* seq_len 1024 \* accum 3 \* ranks 8"):
        build_plan([1024], [5], tokens_per_step=65536, world_size=8, grad_accum=3)


def test_tokens_per_step_not_multiple_of_seq_len():
    with pytest.raises(PlanError, match=r"stages\[1\]: tokens_per_step 1000 is not a multiple of seq_len 256"):
        build_plan([125, 256], [1, 1], tokens_per_step=1000, world_size=1, grad_accum=1)


def test_non_increasing_stages_and_empty_stage_reported_together():
    with pytest.raises(PlanError) as e:
        build_plan([256, 128, 128], [1, 0, 2], tokens_per_step=4096, world_size=1)
    msg = str(e.value)
    assert "stages[1].seq_len 128 must be greater than stages[0].seq_len 256" in msg
    assert "stages[2].seq_len 128 must be greater" in msg
    assert "stages[1] gets 0 optimizer steps" in msg


def test_auto_accumulation_respects_memory_cap():
    plan = build_plan([128, 1024], [1, 1], tokens_per_step=16384, world_size=2, grad_accum=None,
                      max_tokens_per_micro_batch=4096)
    short, long = plan.stages
    assert (short.micro_batch_size, short.grad_accum) == (32, 2)  # 32*128 = 4096 tokens per micro-batch
    assert (long.micro_batch_size, long.grad_accum) == (4, 2)
    assert all(s.micro_batch_size * s.seq_len <= 4096 for s in plan.stages)


def test_fixed_accumulation_over_memory_cap_is_refused():
    with pytest.raises(PlanError, match="exceeds max_tokens_per_micro_batch 2048; raise grad_accum"):
        micro_batch_for(512, 8192, 1, 1, 2048, "growlength.stages[0]")


def test_stage_at_and_data_stages():
    plan = build_plan([64, 128], [3, 2], tokens_per_step=1024, world_size=1)
    assert [plan.stage_at(i).index for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert plan.data_stages() == [(64, 3 * 1024), (128, 2 * 1024)]
    assert plan.stages[1].num_samples(1024) == 16


def test_fingerprint_changes_with_plan():
    a = build_plan([64, 128], [3, 2], tokens_per_step=1024, world_size=1)
    b = build_plan([64, 128], [2, 3], tokens_per_step=1024, world_size=1)
    assert a.fingerprint() == build_plan([64, 128], [3, 2], 1024, 1).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_covers_tokens_per_step_world_size_and_every_stage_field():
    """Which samples a rank reads at a step depends on all of them; a plan differing in any one is another plan
    (one that differs only in the number of ranks is made by hand: a built plan's micro-batches follow it)."""
    plan = build_plan([64, 128], [3, 2], tokens_per_step=2048, world_size=2)
    changed = [replace(plan, tokens_per_step=4096), replace(plan, world_size=1)]
    changed += [replace(plan, stages=(replace(plan.stages[0], **{f.name: getattr(plan.stages[0], f.name) + 1}),
                                      plan.stages[1])) for f in fields(plan.stages[0])]
    assert len({p.fingerprint() for p in changed} | {plan.fingerprint()}) == len(changed) + 1


def test_steps_from_tokens_must_be_whole_steps():
    assert steps_from_tokens([4096, 8192], 4096) == [1, 2]
    with pytest.raises(PlanError, match=r"stages\[1\].tokens 5000 is not a whole number of steps .* use 4096 or 8192"):
        steps_from_tokens([4096, 5000], 4096)


def test_shares_round_to_total():
    assert steps_from_shares([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert sum(steps_from_shares([1 / 3, 1 / 3, 1 / 3], 100)) == 100
    with pytest.raises(PlanError, match="shares sum to 0.9, not 1"):
        steps_from_shares([0.5, 0.4], 10)


def test_time_shares_give_equal_time_per_stage():
    # a step at 128 is 4x cheaper than at 1024: equal time shares -> 4x the steps
    steps = steps_from_time_shares([0.5, 0.5], [0.25, 1.0], total_steps=50)
    assert steps == [40, 10]
    assert steps_from_time_shares([0.5, 0.5], [0.25, 1.0], total_seconds=20) == [40, 10]


def test_plan_from_config_shares_and_time_shares():
    g = GrowLengthConfig(stages=[{"seq_len": 64, "share": 0.75}, {"seq_len": 128, "share": 0.25}],
                         tokens_per_step=1024, total_tokens=1024 * 8)
    plan = plan_from_config(g, world_size=2)
    assert [s.steps for s in plan.stages] == [6, 2]
    assert [s.micro_batch_size for s in plan.stages] == [8, 4]
    t = GrowLengthConfig(stages=[{"seq_len": 64, "time_share": 0.5}, {"seq_len": 128, "time_share": 0.5}],
                         tokens_per_step=1024, total_tokens=1024 * 9)
    plan = plan_from_config(t, world_size=1, step_seconds=lambda stages: [0.1, 0.2])
    assert [s.steps for s in plan.stages] == [6, 3]
    # a resumed run repeats the switch steps it actually took, whatever the probe says now
    plan = plan_from_config(t, world_size=1, step_seconds=lambda stages: [1.0, 0.1], saved_steps=[6, 3])
    assert [s.steps for s in plan.stages] == [6, 3]
    with pytest.raises(PlanError, match="total_tokens 1000 is not a whole number of steps"):
        plan_from_config(GrowLengthConfig(stages=[{"seq_len": 8, "share": 1.0}], tokens_per_step=1024,
                                          total_tokens=1000), 1)
    with pytest.raises(PlanError, match="time_share but no step-time probe"):
        plan_from_config(t, world_size=1)



def test_the_time_share_probe_times_the_micro_batches_the_plan_runs():
    """One rule for the micro-batch: the probe is handed each stage's shape under the per-stage and probed caps."""
    timed = []

    def probe(stages):
        timed.append([(s.seq_len, s.micro_batch_size, s.grad_accum) for s in stages])
        return [0.1, 0.2]

    def config(**long_stage):
        return GrowLengthConfig(stages=[{"seq_len": 64, "time_share": 0.5},
                                        {"seq_len": 128, "time_share": 0.5, **long_stage}],
                                tokens_per_step=1024, total_tokens=1024 * 9, grad_accum=None,
                                max_tokens_per_micro_batch=512)
    plan = plan_from_config(config(), world_size=1, step_seconds=probe)
    assert timed[-1] == [(64, 8, 2), (128, 4, 2)]  # the section's cap: 512 tokens per micro-batch
    plan = plan_from_config(config(max_tokens_per_micro_batch=256), world_size=1, step_seconds=probe)
    assert timed[-1] == [(64, 8, 2), (128, 2, 4)]  # the stage's own cap halves its micro-batch
    assert [(s.micro_batch_size, s.grad_accum) for s in plan.stages] == [(8, 2), (2, 4)]  # and the plan runs it
    plan_from_config(config(), world_size=2, step_seconds=probe, stage_caps=[128, 1024])  # a memory probe's caps
    assert timed[-1] == [(64, 2, 4), (128, 4, 1)]

def test_table_lists_every_stage():
    plan = build_plan([64, 128], [3, 1], tokens_per_step=1024, world_size=1)
    table = plan.table()
    assert "seq_len" in table and "75.0%" in table and "25.0%" in table
    assert "tokens_per_step 1,024 x 4 steps = 4,096 tokens on 1 rank(s)" in table


def test_per_stage_caps_from_a_memory_probe():
    g = GrowLengthConfig(stages=[{"seq_len": 128, "share": 0.5}, {"seq_len": 1024, "share": 0.5}],
                         tokens_per_step=16384, total_tokens=16384 * 4, grad_accum=None)
    plan = plan_from_config(g, world_size=1, stage_caps=[8192, 2048])
    assert [(s.micro_batch_size, s.grad_accum) for s in plan.stages] == [(64, 2), (2, 8)]
    assert all(s.micro_batch_size * s.seq_len * s.grad_accum == 16384 for s in plan.stages)


def test_a_stage_cap_in_the_plan_wins_over_the_probe_and_the_section_cap():
    g = GrowLengthConfig(stages=[{"seq_len": 128, "tokens": 8192},
                                 {"seq_len": 512, "tokens": 8192, "max_tokens_per_micro_batch": 1024}],
                         tokens_per_step=4096, grad_accum=None, max_tokens_per_micro_batch=2048)
    plan = plan_from_config(g, world_size=2)
    # stage 0: the section's cap 2048 -> 16 x 128 x accum 1 x 2 ranks; stage 1: its own cap 1024 -> 2 x 512 x 2 x 2
    assert [(s.micro_batch_size, s.grad_accum) for s in plan.stages] == [(16, 1), (2, 2)]
    probed = plan_from_config(g, world_size=2, stage_caps=[512, 4096])  # a probe replaces the section's cap only
    assert [(s.micro_batch_size, s.grad_accum) for s in probed.stages] == [(4, 4), (2, 2)]
    with pytest.raises(Exception, match=r"growlength.stages\[0\].max_tokens_per_micro_batch must be >= 1"):
        GrowLengthConfig(stages=[{"seq_len": 128, "tokens": 8192, "max_tokens_per_micro_batch": 0}])
