"""logging.downstream_tasks: lm-evaluation-harness runs on every stage-end checkpoint as a background process
while training goes on; a finished run waits for the jobs, and each writes its reports under RUN_DIR/downstream/."""
import json

import pytest

pytest.importorskip("lm_eval")  # in .[dev]

from launcher.config import ConfigError, load_config  # noqa: E402


def test_stage_end_checkpoints_are_evaluated_in_the_background(run, tmp_path, monkeypatch):
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
