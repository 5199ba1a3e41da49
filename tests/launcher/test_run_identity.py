"""Every run-config field is classified as part of a run's identity or not, and a resume check refuses a change of
each identity field (naming it, with both values and the fix) and lets every runtime field change."""
import copy
import dataclasses

import pytest

from launcher import checkpoint as ckpt
from launcher import run_identity
from launcher.config import RunConfig
from model import ModelConfig

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def test_every_config_field_is_classified():
    fields = set(run_identity.config_fields())
    unclassified, stale = sorted(fields - set(run_identity.FIELDS)), sorted(set(run_identity.FIELDS) - fields)
    assert not unclassified, (f"classify {unclassified} in launcher/run_identity.py FIELDS: may a resume change it "
                              f"(runtime), or does the loop compute with it (run, model, plan, data)?")
    assert not stale, f"{stale} are no longer RunConfig fields: remove them from launcher/run_identity.py FIELDS"
    assert {kind for kind, _ in run_identity.FIELDS.values()} <= {run_identity.RUN, run_identity.MODEL,
                                                                  run_identity.PLAN, run_identity.DATA,
                                                                  run_identity.RUNTIME}


def _state(config: dict, model: dict) -> ckpt.CheckpointState:
    return ckpt.CheckpointState(
        step=4, stage=0, loader={}, tokens_seen=0, elapsed_s=0.0, stage_seconds={}, plan=[], plan_fingerprint="p",
        tokens_per_step=1024, world_size=1, seed=config["seed"], data_fingerprint="d", data_prefix="a",
        data_prefix_resolved="/a", tokenizer="t", tokenizer_resolved="/t", tokenizer_in_run=None, model=model,
        config=config)


def _changed(state: ckpt.CheckpointState, name: str) -> ckpt.CheckpointState:
    """``state`` with the field ``name`` given another value, where the launcher records it: the run config, and for
    a ModelConfig field the built model too, and the seed in its own field."""
    config, model = copy.deepcopy(state.config), dict(state.model)
    section, _, key = name.rpartition(".")
    node = config[section] if section else config
    node[key] = ["changed", node.get(key)]
    if section == "model" and key in MODEL_FIELDS:
        model[key] = ["changed", model.get(key)]
    return dataclasses.replace(state, config=config, model=model, seed=config["seed"])


@pytest.mark.parametrize("name", sorted(run_identity.FIELDS))
def test_a_resume_refuses_identity_changes_and_allows_runtime_ones(name, tmp_path):
    kind, why = run_identity.FIELDS[name]
    saved = _state(RunConfig().to_dict(), ModelConfig.from_preset("tiny", vocab_size=512).to_dict())
    current = _changed(saved, name)
    if kind in (run_identity.RUN, run_identity.MODEL):
        with pytest.raises(ckpt.CheckpointError, match="cannot resume from") as e:
            ckpt.check_compatible(saved, current, tmp_path, force=False)
        key = name if kind == run_identity.RUN else name.split(".", 1)[1]
        old = run_identity._lookup(saved.config, name) if kind == run_identity.RUN or key not in MODEL_FIELDS \
            else saved.model[key]
        assert f"{key}: {old!r} -> " in str(e.value) or f"{key} {old!r} -> " in str(e.value), str(e.value)
        if kind == run_identity.RUN:
            assert f"to continue this run set {name}=" in str(e.value)
    else:  # runtime, or compared through the plan or data fingerprint (unchanged here): not a difference by value
        assert ckpt.check_compatible(saved, current, tmp_path, force=False) == []


def test_the_loops_rope_and_warmup_are_identity():
    """What the issue found treated as runtime-only: RoPE scaling divides positions, warmup moves the LR."""
    for name in ("model.rope_scaling", "model.rope_scaling_factor", "optimisation.warmup_steps",
                 "optimisation.warmup_fraction"):
        assert run_identity.FIELDS[name][0] != run_identity.RUNTIME, name
