"""logging.downstream_tasks: lm-evaluation-harness runs on every stage-end checkpoint as a background process
while training goes on; a finished run waits for the jobs, and each writes its reports under RUN_DIR/downstream/."""
import json

import pytest

pytest.importorskip("lm_eval")  # in .[dev]

from launcher.config import ConfigError, load_config  # noqa: E402


def test_stage_end_checkpoints_are_evaluated_in_the_background(spawns, run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": f"item {i} is", "c": ["a value", "the string"], "y": i % 2}) + "\n"
                            for i in range(4)))
    task = tmp_path / "mc.yaml"
    task.write_text(f"task: growlength_bg_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{q}}}}\"\n"
                    f"doc_to_choice: \"{{{{c}}}}\"\ndoc_to_target: \"{{{{y}}}}\"\nmetric_list:\n  - metric: acc\n")
    code, out = run("growlength.stages=[{seq_len: 32, tokens: 4096}, {seq_len: 64, tokens: 4096}]",
                    "logging.log_interval=1", "checkpointing.keep_last=1",
                    f"logging.downstream_tasks=[{task}]", "logging.downstream_limit=3")
    assert code == 0, out
    log = (run.run_dir / "train.log").read_text()
    # stage 0 ends at step 4: its job starts there; the end of the run waits for the step-8 job
    started = log.index("downstream evaluation of step 4 started in the background")
    assert started < log.index("step 5 |") < log.index("waiting for the downstream evaluation of step_00000008")
    assert "downstream evaluation of step 8 started" in log and "failed" not in log
    for step in (4, 8):
        report = json.loads((run.run_dir / "downstream" / f"step_{step:08d}.json").read_text())
        assert report["source"]["step"] == step and "acc,none" in report["results"]["growlength_bg_mc"]
        assert (run.run_dir / "downstream" / f"step_{step:08d}.md").is_file()


def test_downstream_tasks_need_the_harness(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.downstream_tasks: lm-evaluation-harness is not installed; pip "
                                          r"install 'growlength\[eval\]'"):
        load_config(None, ["logging.downstream_tasks=[hellaswag]"])


# a stand-in for evidence.downstream that runs until the test lets it go (or 120 s pass), then exits 0 or 3
HOLD = ("import os, sys, time\n"
        "go = sys.argv[sys.argv.index('--out') + 1] + '.go'\n"
        "deadline = time.time() + 120\n"
        "while not os.path.exists(go) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "sys.exit(0 if os.path.exists(go) else 3)\n")


def test_start_returns_while_the_job_runs_and_its_checkpoint_is_kept(spawns, tmp_path, monkeypatch, caplog):
    import logging
    import sys
    from launcher import checkpoint as ckpt
    from launcher.downstream_jobs import DownstreamJobs
    monkeypatch.setattr(DownstreamJobs, "COMMAND", (sys.executable, "-c", HOLD))
    root = tmp_path / "run" / "checkpoints"
    tags = [root / ckpt.tag_for(s) for s in (4, 8, 12)]
    for t in tags:
        t.mkdir(parents=True)
        (t / ckpt.STATE_FILE).write_text("{}")
    jobs = DownstreamJobs(tmp_path / "run", ["task"], None, enabled=True)
    caplog.set_level(logging.INFO, "growlength")
    jobs.start(tags[0], 4)
    assert jobs.jobs[tags[0]].poll() is None  # start() returned; the job waits for the test's signal
    ckpt.prune(root, keep_last=1, keep=jobs.busy())  # the step-4 checkpoint is being evaluated: kept
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000012"]
    (tmp_path / "run" / "downstream" / "step_00000004.go").write_text("")
    jobs.close(wait=True)
    assert "waiting for the downstream evaluation of step_00000004" in caplog.text
    assert "downstream evaluation of step_00000004 finished" in caplog.text and not jobs.jobs
    ckpt.prune(root, keep_last=1, keep=jobs.busy())
    assert [p.name for p in root.iterdir()] == ["step_00000012"]
    jobs.start(tags[2], 12)
    jobs.close(wait=False)  # a stopped run ends its jobs
    assert "downstream evaluation of step_00000012 failed (exit -15)" in caplog.text
    assert DownstreamJobs(tmp_path / "run", [], None, enabled=True).enabled is False
