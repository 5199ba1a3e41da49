"""Every bad input the launcher can meet gives exit code 2 and one clear message naming the field or file, before
any training or any file of the run is written."""
import json
import shutil

from launching import ZERO2
from runner import assert_refused


def test_unknown_preset(run):
    assert_refused(run("model.preset=pythia-7b"), "model.preset must be 'tiny' or 'narrow-4x128' or 'pythia-70m' or",
                   run.run_dir)


def test_stage_lengths_must_grow(run):
    assert_refused(run("growlength.stages=[{seq_len: 64, tokens: 2048}, {seq_len: 32, tokens: 2048}]"),
                   "stages[1].seq_len 32 must be greater than stages[0].seq_len 64", run.run_dir)


def test_plan_that_cannot_keep_tokens_per_step(run):
    assert_refused(run("growlength.stages=[{seq_len: 48, tokens: 3072}]"),
                   "tokens_per_step 1024 is not a multiple of seq_len 48", run.run_dir)


def test_plan_beyond_the_data_with_epochs_error(run):
    assert_refused(run("data.epochs=error", "growlength.stages=[{seq_len: 32, tokens: 10240000}]"),
                   "Add data, lower the stage token budgets, or allow repeats with epochs='repeat'", run.run_dir)


def test_ds_config_contradicting_the_plan(run, tmp_path):
    cfg = json.loads(ZERO2.read_text())
    cfg["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    assert_refused(run(ds_config=str(path)),
                   f"{path}: train_micro_batch_size_per_gpu is 3 but the GrowLength plan needs 32", run.run_dir)


def test_resume_of_something_that_is_not_a_checkpoint(run, tmp_path):
    assert_refused(run(f"checkpointing.resume={tmp_path}"), "not a checkpoint", run.run_dir)


def test_missing_data(run, tmp_path):
    assert_refused(run(prefix=str(tmp_path / "nothing")), "nothing", run.run_dir)


def test_corrupt_index(run, tmp_path, tokenized):
    bad = tmp_path / "bad"
    shutil.copy(tokenized + ".bin", str(bad) + ".bin")
    raw = bytearray(open(tokenized + ".idx", "rb").read())
    raw[:9] = b"NOTMMIDX\x00"
    (tmp_path / "bad.idx").write_bytes(bytes(raw))
    assert_refused(run(prefix=str(bad)), "bad.idx", run.run_dir)


def test_tokenizer_that_did_not_make_the_data(run, tmp_path, corpus_jsonl, tokenized):
    """The data's tokenizer record refuses any other tokenizer, also one of the same vocabulary size whose ids
    all fit (a byte-level BPE, EOD 0, on sentencepiece data, EOD 2); without a record the largest id decides."""
    from data_pipeline.train_tokenizer import train_bytelevel_bpe, train_tokenizer
    bpe = train_bytelevel_bpe([corpus_jsonl], str(tmp_path / "bpe"), vocab_size=1000, quiet=True)
    before = {ext: open(tokenized + ext, "rb").read() for ext in (".bin", ".idx", ".tokenizer.json")}
    assert_refused(run(tokenizer=bpe), "data.tokenizer " + bpe + " did not make " + tokenized, run.run_dir)
    assert {ext: open(tokenized + ext, "rb").read() for ext in before} == before
    small = train_tokenizer([corpus_jsonl], str(tmp_path / "small"), vocab_size=400, num_threads=1, quiet=True)
    unrecorded = tmp_path / "unrecorded"  # as Megatron's tools leave it: no .tokenizer.json
    for ext in (".bin", ".idx"):
        shutil.copy(tokenized + ext, str(unrecorded) + ext)
    assert_refused(run(prefix=str(unrecorded), tokenizer=small), "the data was made with another tokenizer",
                   run.run_dir)


def test_bad_override_and_missing_tokenizer(run, tmp_path):
    assert_refused(run("growlength.tokens_per_stepp=2"), "unknown config keys ['growlength.tokens_per_stepp']")
    assert_refused(run(tokenizer=str(tmp_path / "none.model")), "none.model: no such file")


def test_memory_probe_file(run, tmp_path):
    assert_refused(run("growlength.grad_accum=null", f"growlength.micro_batch_probe={tmp_path}/none.json"),
                   "none.json: no such file; make one with python -m evidence.bench_lengths", run.run_dir)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"lengths": [{"seq_len": 16, "max_tokens_per_batch": 4096}]}))
    assert_refused(run("growlength.grad_accum=null", f"growlength.micro_batch_probe={probe}"),
                   "seq_len 32 is longer than every length in the probe", run.run_dir)


def test_data_rewritten_under_the_run_stops_it_before_the_next_checkpoint(run, tmp_path, tokenized, monkeypatch):
    """A .bin rewritten in place after step 1: the save of step 2 is refused, naming the file; no checkpoint of
    steps that read changed data."""
    from launcher import faults

    data = tmp_path / "data"
    for ext in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy(tokenized + ext, str(data) + ext)

    def rewrite(self, step):
        if step == 1:
            with open(str(data) + ".bin", "r+b") as f:  # same inode, same size: only the contents change
                f.write(b"\x01\x00" * 8)

    monkeypatch.setattr(faults.FaultInjection, "after_step", rewrite)
    code, out = run("checkpointing.interval_steps=2", prefix=str(data))
    assert code == 2, out
    assert f"{data}.bin: rewritten in place (" in out and "found before the checkpoint of step 2" in out
    assert not (run.run_dir / "checkpoints" / "step_00000002").exists()
