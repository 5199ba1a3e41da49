"""evidence.downstream: lm-evaluation-harness on a trained tiny run, offline, with a multiple-choice task whose
documents are a local JSON file made here. The harness's per-choice loglikelihoods must equal our own model's
(launcher checkpoint, sentencepiece tokenizer, plain PyTorch), and its accuracy the argmax of those."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")  # in .[dev]

from evidence import downstream  # noqa: E402
from evidence.export_hf import load_trained_model  # noqa: E402
from evidence.runs import EvidenceError  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402
from launching import pretrain_args  # noqa: E402

DOCS = [{"question": "The function returns", "choices": ["a value.", "the string", "nothing at all", "1 2 3"],
         "label": 0},
        {"question": "Python lists are", "choices": ["mutable sequences", "keywords", "zebra", "x"], "label": 0},
        {"question": "An exception is raised when", "choices": ["an error occurs", "blue", "tabs\tand", "!?"],
         "label": 2},
        {"question": "for i in", "choices": ["range(10):", "the house", "yes", "unicode: ünïcödé"], "label": 1},
        {"question": "The with statement", "choices": ["is used to wrap", "of", "42", "emoji 🙂"], "label": 3}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenized, sp_model, launch):
    run_dir = tmp_path_factory.mktemp("downstream") / "run"
    proc = launch(pretrain_args(run_dir, tokenized, sp_model, "logging.eval_tokens=1024", "logging.eval_lengths=[128]",
                                "growlength.tokens_per_step=512",
                                "growlength.stages=[{seq_len: 32, tokens: 3072}, {seq_len: 64, tokens: 3072}]"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def task_file(tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    yaml = tmp_path / "tasks" / "tiny_mc.yaml"
    yaml.parent.mkdir()
    yaml.write_text(f"task: growlength_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                    f"doc_to_text: \"{{{{question}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
                    f"doc_to_target: \"{{{{label}}}}\"\nmetric_list:\n  - metric: acc\n")
    return yaml


def reference_loglikelihoods(run_dir, sp_model):
    """log p(" " + choice | question) summed over the choice's tokens, by our model and tokenizer."""
    model, _, _ = load_trained_model(run_dir)
    tok = Tokenizer(sp_model)
    out = []
    for d in DOCS:
        context = tok.encode(d["question"])
        row = []
        for choice in d["choices"]:
            whole = tok.encode(d["question"] + " " + choice)
            assert whole[:len(context)] == context
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]]))[0].float()  # (T - 1, V)
            logp = torch.log_softmax(logits, -1)
            row.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        out.append(row)
    return out


def test_harness_on_a_local_task_matches_our_model(trained, sp_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    yaml = task_file(tmp_path)
    assert downstream.main(["--checkpoint", str(trained), "--tasks", str(yaml), "--bootstrap-iters", "0",
                            "--log-samples", "--batch-size", "2"]) == 0
    reports = sorted((trained / "downstream").iterdir())
    assert [p.name for p in reports] == ["step_00000012.json", "step_00000012.md", "step_00000012.samples.json"]
    report = json.loads(reports[0].read_text())
    assert report["source"]["step"] == 12 and report["source"]["tasks"] == ["growlength_tiny_mc"]

    expected = reference_loglikelihoods(trained, sp_model)
    samples = sorted(json.loads(reports[2].read_text())["growlength_tiny_mc"], key=lambda s: s["doc_id"])
    harness = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert sum(harness, []) == pytest.approx(sum(expected, []), abs=1e-4)
    accuracy = sum(max(range(4), key=row.__getitem__) == d["label"] for row, d in zip(expected, DOCS)) / len(DOCS)
    assert report["results"]["growlength_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    table = reports[1].read_text()
    assert "growlength_tiny_mc" in table and "acc" in table and "step 12" in table


def test_bad_task_arguments(tmp_path, trained):
    with pytest.raises(EvidenceError, match=r"--tasks .*missing\.yaml: no such file"):
        downstream.parse_tasks(str(tmp_path / "missing.yaml"))
    (tmp_path / "x.yaml").write_text("dataset_path: json\n")
    with pytest.raises(EvidenceError, match=r"--tasks .*x\.yaml: a task file names its task in a `task:` field"):
        downstream.parse_tasks(str(tmp_path / "x.yaml"))
    with pytest.raises(EvidenceError, match=r"--tasks ',': no task given"):
        downstream.parse_tasks(",")
    assert downstream.parse_tasks("hellaswag, arc_easy") == (["hellaswag", "arc_easy"], [])
    with pytest.raises(EvidenceError, match=r"--out is required for a Hugging Face directory"):
        downstream.report_paths(None, None, None)


def test_export_model_card_records_plan_schedule_and_final_losses(trained, tmp_path):
    from evidence.export_hf import export
    from launcher import checkpoint as ckpt
    from launcher.metrics import read_metrics
    out = export(str(trained), str(tmp_path / "hf"))
    card = (out / "README.md").read_text()
    state = ckpt.read_state(ckpt.resolve_resume("auto", str(trained)))
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"step {state.step:,}, {state.tokens_seen:,} tokens" in card
    for s in state.plan:  # one row per stage: seq_len, micro-batch, accumulation, steps, tokens
        assert (f"| {s['index']} | {s['seq_len']} | {s['micro_batch_size']} | {s['grad_accum']} | {s['steps']} | "
                f"{s['tokens']:,} |") in card
    scheduler = json.loads((trained / "ds_config.resolved.json").read_text())["scheduler"]
    assert f"- scheduler: {scheduler['type']} (" in card and "total_num_steps=12" in card
    # the last validation loss at each length, found here from metrics.jsonl by hand
    last = {}
    for r in read_metrics(trained):
        if r.get("kind") == "eval":
            last.update({int(k.rsplit("_", 1)[1]): (v, r["step"]) for k, v in r.items() if k.startswith("val_loss_")})
    assert sorted(last) == [32, 64, 128]
    for length, (loss, step) in last.items():
        assert f"| all | {length} | {loss:.4f} |" in card and card.split(f"| all | {length} | ")[1].split("\n")[0] \
            .endswith(f"| {step} |")
