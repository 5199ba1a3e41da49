"""Bad input and faults for the evidence tools (export_hf, evaluate, plot, compare) and the metrics readers: exit code
2 and one line naming the file and the fix, and every file that existed before byte-identical afterwards.

One module-scoped training (1 rank, 32 -> 64, 4 steps) started from a working directory with *relative*
data and tokenizer paths, as users do; tests that move or damage the run work on a copy of it.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from evidence import compare, evaluate, export_hf, plot
from launcher import checkpoint as ckpt
from launcher.metrics import METRICS_FILE, MetricsError, read_metrics, truncate_after
from evidence.runs import load_run
from launching import pretrain_args

STATE = "growlength_state.json"
# relative paths, as a user gives them from the working directory
TRAIN_ARGS = pretrain_args("run", "data/corpus", "tok/tok.model", "checkpointing.interval_steps=2",
                           "logging.log_interval=2", "logging.eval_tokens=256", "growlength.tokens_per_step=512",
                           "growlength.stages=[{seq_len: 32, tokens: 1024}, {seq_len: 64, tokens: 1024}]",
                           cache_dir="index-cache")


def train(launch, work: Path, *extra: str) -> str:
    """The real launcher on one rank, as a user starts it from ``work`` (a subprocess: DeepSpeed keeps process-wide
    state, so a second engine in one process is not what users run)."""
    proc = launch([*TRAIN_ARGS, *extra], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenized, sp_model, launch):
    """A working directory holding data/, tok/ and the trained run/ (relative paths in its checkpoints)."""
    work = tmp_path_factory.mktemp("work")
    (work / "data").mkdir()
    (work / "tok").mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(tokenized + ext, work / "data" / f"corpus{ext}")
    shutil.copy(sp_model, work / "tok" / "tok.model")
    train(launch, work)
    state = ckpt.read_state(work / "run" / "checkpoints" / "step_00000004")
    assert state.tokenizer == "tok/tok.model" and state.data_prefix == "data/corpus"  # as given: relative
    assert state.tokenizer_in_run == "tokenizer/tokenizer.model"
    return work


def snapshot(root: Path) -> dict:
    """Every file under ``root`` -> sha256: compared before and after a refusal."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(work: Path, dest: Path) -> Path:
    """A copy of the trained run elsewhere (its checkpoints hold the tokenizer copy and the resolved paths)."""
    shutil.copytree(work / "run", dest)
    return dest


# ---- export_hf: never destroys the run, replaces atomically -----------------------------------------------------
@pytest.mark.parametrize("where, message", [
    (lambda run: run, "is the run directory"),
    (lambda run: run / "hf", "is inside the run directory"),
    (lambda run: run / "checkpoints", "is inside the run directory"),
    (lambda run: run.parent, "contains the run directory"),
])
def test_export_refuses_an_out_that_is_inside_or_holds_the_run(work, tmp_path, caplog, where, message):
    run = copy_run(work, tmp_path / "run")
    before = snapshot(tmp_path)
    rc = export_hf.main(["--checkpoint", str(run), "--out", str(where(run)), "--overwrite"])
    assert rc == 2 and message in caplog.text and "write the export elsewhere" in caplog.text
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_only_a_previous_export(work, tmp_path, caplog):
    run = copy_run(work, tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous export (a stale one)
    (out / "stale.txt").write_text("from the old export")
    assert export_hf.main(["--checkpoint", str(run), "--out", str(out)]) == 2
    assert "exists and is not empty" in caplog.text and (out / "stale.txt").is_file()
    assert export_hf.main(["--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert (out / "tokenizer.model").read_bytes() == (work / "tok" / "tok.model").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or old dir left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    before = snapshot(mine)
    assert export_hf.main(["--checkpoint", str(run), "--out", str(mine), "--overwrite"]) == 2
    assert "holds no config.json, so it is not a previous export" in caplog.text
    assert snapshot(mine) == before
    (tmp_path / "afile").write_text("x")
    assert export_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "afile")]) == 2
    assert "afile is a file, not a directory" in caplog.text
    assert export_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "afile" / "hf")]) == 2
    assert "afile is a file, not a directory; choose another --out" in caplog.text


# ---- a run stands on its own: another working directory, a moved run --------------------------------------------
def test_export_and_evaluate_from_elsewhere_after_moving_the_run(work, tmp_path, monkeypatch, caplog):
    moved = copy_run(work, tmp_path / "moved" / "run")
    gone = tmp_path / "tok-away"  # the original tokenizer is gone: only the run's own copy can serve
    shutil.move(str(work / "tok"), gone)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded relative paths (tok/..., data/...) mean nothing here
    try:
        assert export_hf.main(["--checkpoint", str(moved), "--out", "hf"]) == 0
        assert (elsewhere / "hf" / "tokenizer.model").read_bytes() == (moved / "tokenizer" / "tokenizer.model").read_bytes()
        report = evaluate.evaluate(str(moved), lengths=[32], tokens=256)
        assert report["data_prefix"] == str((work / "data" / "corpus").resolve()) and report["split"] == "run"
        # the model HF loads is the one evaluate scores: same loss on the same windows through the export
        via_hf = evaluate.evaluate(str(elsewhere / "hf"), data_prefix=report["data_prefix"], lengths=[32],
                                   split="run", valid_fraction=0.1, tokens=256)
        assert via_hf["results"][0]["loss"] == pytest.approx(report["results"][0]["loss"], rel=1e-5)
        # nothing anywhere: one line with the places looked at and the flag
        (moved / "tokenizer" / "tokenizer.model").unlink()
        assert export_hf.main(["--checkpoint", str(moved), "--out", "hf2"]) == 2
        assert "the tokenizer it was trained with is not found (looked at" in caplog.text
        assert str(moved / "tokenizer" / "tokenizer.model") in caplog.text and "--tokenizer PATH" in caplog.text
        assert not (elsewhere / "hf2").exists()
        assert export_hf.main(["--checkpoint", str(moved), "--out", "hf2", "--tokenizer",
                               str(gone / "tok.model")]) == 0
        assert evaluate.main(["--checkpoint", str(moved), "--lengths", "32", "--data-prefix",
                              str(tmp_path / "nothing")]) == 2
        assert "--data-prefix" in caplog.text and "nothing.bin not found" in caplog.text
    finally:
        shutil.move(str(gone), work / "tok")


# ---- evaluate: the output place is checked before the work ------------------------------------------------------
def test_evaluate_out_in_an_unwritable_place_is_refused_before_the_work(work, tmp_path, caplog, capsys):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    rc = evaluate.main(["--checkpoint", str(work / "run"), "--lengths", "32", "--out",
                        str(tmp_path / "afile" / "eval.json")])
    assert rc == 2 and "afile is a file, not a directory; choose another --out" in caplog.text
    assert "seq_len" not in capsys.readouterr().out  # refused before any evaluation, not after printing the table
    assert evaluate.main(["--checkpoint", str(work / "run"), "--lengths", "32", "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in caplog.text
    assert snapshot(tmp_path) == before
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert evaluate.main(["--checkpoint", str(work / "run"), "--out", str(ro / "e.json")]) == 2
        assert "cannot write in" in caplog.text


def test_evaluate_and_export_name_a_damaged_checkpoint(work, tmp_path, caplog):
    run = copy_run(work, tmp_path / "run")
    state = run / "checkpoints" / "step_00000004" / STATE
    state.write_bytes(state.read_bytes()[:100])  # torn
    assert evaluate.main(["--checkpoint", str(state.parent), "--lengths", "32"]) == 2
    assert f"{state} is unreadable" in caplog.text and "use another checkpoint" in caplog.text
    model = next((run / "checkpoints" / "step_00000002").glob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[:1000])
    before = snapshot(run)
    assert export_hf.main(["--checkpoint", str(model.parent), "--out", str(tmp_path / "hf")]) == 2
    assert f"{model.parent}: the DeepSpeed model or optimizer files cannot be read" in caplog.text
    assert snapshot(run) == before and not (tmp_path / "hf").exists()


# ---- data, tokenizer and model that do not belong together ----------------------------------------------------
def test_export_refuses_a_tokenizer_larger_than_the_model(work, tmp_path, caplog, corpus_jsonl):
    from data_pipeline.train_tokenizer import train_tokenizer
    big = train_tokenizer([corpus_jsonl], str(tmp_path / "big"), vocab_size=1200, num_threads=1, quiet=True)
    before = snapshot(work / "run")
    assert export_hf.main(["--checkpoint", str(work / "run"), "--out", str(tmp_path / "hf"), "--tokenizer", big]) == 2
    assert f"--tokenizer {big}: 1,200 ids but the model of " in caplog.text and "has 1,000 (its embedding" in caplog.text
    assert snapshot(work / "run") == before and not (tmp_path / "hf").exists()


def test_export_refuses_a_unigram_tokenizer_before_consolidating(work, tmp_path, caplog, corpus_jsonl, monkeypatch):
    from data_pipeline.train_tokenizer import train_tokenizer
    uni = train_tokenizer([corpus_jsonl], str(tmp_path / "uni"), vocab_size=1000, model_type="unigram",
                          num_threads=1, quiet=True)
    monkeypatch.setattr(export_hf, "load_trained_model", lambda *a: pytest.fail("consolidated before the check"))
    before = snapshot(work / "run")
    assert export_hf.main(["--checkpoint", str(work / "run"), "--out", str(tmp_path / "hf"), "--tokenizer", uni]) == 2
    assert f"{uni}: a sentencepiece unigram model has no Hugging Face tokenizer.json" in caplog.text
    assert "Traceback" not in caplog.text
    assert snapshot(work / "run") == before and not (tmp_path / "hf").exists()


def test_evaluate_refuses_data_of_another_tokenizer_or_past_the_vocabulary(work, tmp_path, caplog, corpus_jsonl):
    from data_pipeline.indexed_dataset import write_dataset
    from data_pipeline.preprocess import preprocess
    from data_pipeline.train_tokenizer import train_bytelevel_bpe
    bpe = train_bytelevel_bpe([corpus_jsonl], str(tmp_path / "bpe"), vocab_size=1000, quiet=True)
    other = str(tmp_path / "other")
    preprocess([corpus_jsonl], other, bpe, quiet=True)  # every id < 1000: only its record tells
    wide = write_dataset(str(tmp_path / "wide"), [[5, 6, 1500, 2]] * 64)  # no record: its ids tell
    before = snapshot(tmp_path)
    assert evaluate.main(["--checkpoint", str(work / "run"), "--data-prefix", other, "--lengths", "32"]) == 2
    assert "its tokenizer " in caplog.text and f"did not make {other}: " in caplog.text
    caplog.clear()
    assert evaluate.main(["--checkpoint", str(work / "run"), "--data-prefix", wide, "--lengths", "32"]) == 2
    assert "has a vocabulary of 1,000: " in caplog.text and "token id 1500 at token 2" in caplog.text
    assert "Traceback" not in caplog.text and snapshot(tmp_path) == before


# ---- metrics.jsonl: a torn last line never blocks a resume or a plot; a bad middle line is named ----------------
def test_torn_last_line_is_dropped_by_plot_and_by_resume(work, launch, tmp_path, caplog):
    shutil.copytree(work, tmp_path / "w")
    run = tmp_path / "w" / "run"
    metrics = run / METRICS_FILE
    whole = metrics.read_bytes()
    n = len(read_metrics(run))
    metrics.write_bytes(whole + b'{"step": 5, "stage": 1, "loss": 3.1')  # a kill mid-write
    assert len(read_metrics(run)) == n and "dropped a torn last line" in caplog.text
    assert f"{metrics}:{n + 1}" in caplog.text
    assert plot.main([str(run), "--out", str(tmp_path / "plots")]) == 0
    assert load_run(run).final["step"] == 4
    # the resume (the launcher calls truncate_after) takes the run back without the torn line, byte for byte
    log = train(launch, tmp_path / "w")
    assert "resumed from" in log and "dropped a torn last line" in log
    assert metrics.read_bytes() == whole
    metrics.write_bytes(whole + b"\x00" * 64)  # a full disk / crash: NUL-padded tail
    assert truncate_after(run, 4) == 0 and metrics.read_bytes() == whole


def test_corrupt_middle_line_names_file_and_line(work, tmp_path, caplog):
    run = copy_run(work, tmp_path / "run")
    metrics = run / METRICS_FILE
    lines = metrics.read_bytes().split(b"\n")
    lines[2] = lines[2][:-5]
    metrics.write_bytes(b"\n".join(lines))
    before = snapshot(run)
    with pytest.raises(MetricsError, match=rf"{metrics}:3: not a JSON record .* restore it from a backup"):
        truncate_after(run, 2)
    assert plot.main([str(run), "--out", str(tmp_path / "plots")]) == 2
    assert f"{metrics}:3: not a JSON record" in caplog.text
    assert snapshot(run) == before and not (tmp_path / "plots").exists()


# ---- plot / compare: outputs complete or absent -----------------------------------------------------------------
def test_plot_and_compare_refuse_an_unwritable_out(work, tmp_path, caplog):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    assert plot.main([str(work / "run"), "--out", str(tmp_path / "afile" / "plots")]) == 2
    assert "afile is a file, not a directory" in caplog.text
    rc = compare.main(["--budget-tokens", "4096", "--out", str(tmp_path / "afile" / "cmp"), "--lengths", "32,64",
                       "--shares", "0.5,0.5", "--tokens-per-step", "512"])
    assert rc == 2 and "--out" in caplog.text and "afile is a file, not a directory" in caplog.text
    assert snapshot(tmp_path) == before
    report = tmp_path / "not-a-report.json"
    report.write_text("[1, 2]")
    assert plot.main([str(work / "run"), "--out", str(tmp_path / "p"), "--eval-json", str(report)]) == 2
    assert "not a evidence.evaluate report (no results list)" in caplog.text


def test_compare_names_a_bad_ds_config_before_any_run(tmp_path, caplog):
    bad = tmp_path / "ds.json"
    bad.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 7}}')
    rc = compare.main(["--budget-seconds", "5", "--out", str(tmp_path / "cmp"), "--lengths", "32,64",
                       "--shares", "0.5,0.5", "--tokens-per-step", "512", "--ds-config", str(bad)])
    assert rc == 2 and f"--ds_config {bad} has 2 problems" in caplog.text
    assert not (tmp_path / "cmp" / "runs").exists()
