"""Weights & Biases: a real launcher run (tiny config, CPU) with logging.wandb in offline mode, preempted and
resumed; the offline runs' own .wandb files (W&B's transaction log of protobuf records, read with wandb's protobuf
definitions) hold the config, the stage plan and every metrics.jsonl record, in one W&B run id."""
import json
import struct
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")  # in .[dev]

from launcher.signals import EXIT_PREEMPTED  # noqa: E402
from launcher.config import ConfigError, load_config  # noqa: E402
from launcher.metrics import read_metrics  # noqa: E402
from launcher.trackers import flatten  # noqa: E402

BLOCK = 32768  # the transaction log's block size (LevelDB's log format)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB log blocks
    of chunks (crc32c 4 bytes, length 2, type 1) that join into records."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_runs(run_dir: Path):
    """{run id: [(step, {key: value})]} and {run id: config} over every offline run of RUN_DIR/wandb."""
    history, config = {}, {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                history.setdefault(run_id, [])
                for item in record.run.config.update:
                    config.setdefault(run_id, {})[item.key] = json.loads(item.value_json)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[run_id].append((record.history.step.num, items))
            elif kind == "config":
                for item in record.config.update:
                    config.setdefault(run_id, {})[item.key] = json.loads(item.value_json)
    return history, config


def test_offline_run_holds_every_metrics_record_and_resumes_into_the_same_run(run, monkeypatch):
    args = ["growlength.stages=[{seq_len: 32, tokens: 4096}, {seq_len: 64, tokens: 4096}]",
            "logging.eval_interval=2", "logging.eval_lengths=[128]", "logging.log_interval=1",
            "checkpointing.interval_steps=100",
            "logging.wandb={project: growlength-test, name: tiny, mode: offline}"]
    monkeypatch.setenv("GROWLENGTH_FAULT", "sigusr1@3")  # preempted after step 3: checkpoint, exit for a requeue
    code, out = run(*args)
    assert code == EXIT_PREEMPTED, out
    monkeypatch.delenv("GROWLENGTH_FAULT")
    code, out = run(*args)  # the requeued job resumes from step 3
    assert code == 0, out
    records = read_metrics(run.run_dir)
    assert {r.get("kind") for r in records} >= {None, "eval", "stage"} and max(r["step"] for r in records) == 8

    history, config = read_offline_runs(run.run_dir)
    assert len(history) == 1, f"two W&B runs for one training run: {sorted(history)}"
    (run_id, rows), = history.items()
    assert run_id == (run.run_dir / "wandb" / "run_id").read_text().strip()
    assert len(list((run.run_dir / "wandb").glob("offline-run-*"))) == 2  # one per process, synced into one run

    logged: dict[int, dict] = {}
    for step, items in rows:
        assert step == items["_step"]
        for key, value in items.items():
            logged.setdefault(step, {}).setdefault(key, value)  # the first value: re-logged steps are dropped
    for record in records:  # every metrics.jsonl record, every numeric field, at its step
        for key, value in flatten(record).items():
            assert logged.get(record["step"], {}).get(key) == pytest.approx(value), (record, key)
    assert any("eval/val_loss_128" in v for v in logged.values())
    assert any("train/mfu" not in v and "train/tokens_per_s" in v for v in logged.values())  # mfu null on CPU
    assert [s["seq_len"] for s in config[run_id]["plan"]] == [32, 64]
    assert config[run_id]["config"]["logging"]["wandb"]["mode"] == "offline"


def test_flatten_record():
    assert flatten({"kind": "stage", "step": 4, "seq_len": 64, "tokens_by_source": {"web": 10, "code": 2},
                    "compile": "eager", "mfu": None, "ok": True}) == {
        "stage/seq_len": 64, "stage/tokens_by_source/web": 10, "stage/tokens_by_source/code": 2}
    assert flatten({"step": 1, "loss": 2.5}) == {"train/loss": 2.5}


@pytest.mark.parametrize("override, message", [
    ("logging.wandb={mode: offline}", "logging.wandb.project is required"),
    ("logging.wandb={project: p, mode: sometimes}", "logging.wandb.mode must be online or offline or disabled, "
                                                    "got 'sometimes'"),
    ("logging.wandb={project: p, team: x}", "logging.wandb: unknown keys ['team']; valid: project, name, mode"),
    ("logging.wandb={project: p, tags: a}", "logging.wandb.tags must be a list of strings, got 'a'"),
    ("logging.wandb=offline", "logging.wandb must be a mapping or null, got 'offline'"),
])
def test_bad_wandb_config(override, message):
    with pytest.raises(ConfigError, match=rf"{__import__('re').escape(message)}"):
        load_config(None, [override])


def test_missing_wandb_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb: the wandb package is not installed; pip install "
                                          r"'growlength\[wandb\]'"):
        load_config(None, ["logging.wandb={project: p, mode: offline}"])
    load_config(None, ["logging.wandb={mode: disabled}"])  # disabled needs neither the package nor a project


def test_two_ranks_log_from_rank_0_only(train, tmp_path, tokenized, sp_model):
    """`deepspeed --num_gpus 2` on CPU ranks: one offline W&B run, with every step once."""
    from runner import ok
    run_dir = tmp_path / "run"
    ok(train(run_dir, tokenized, sp_model, "logging.wandb={project: growlength-test, mode: offline}",
             "growlength.stages=[{seq_len: 32, tokens: 4096}]", "checkpointing.interval_steps=100"))
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    history, _ = read_offline_runs(run_dir)
    (rows,) = history.values()
    steps = [step for step, items in rows if "train/loss" in items]
    assert steps == [r["step"] for r in read_metrics(run_dir) if "kind" not in r] == [1, 2, 3, 4]
