"""Bad input and faults, tool by tool (issue 10): every case ends with exit status 2 (inspect: 1 for a damaged
dataset) and one line naming the file or flag and the fix, no traceback, and the files that were there before are
byte-identical afterwards. Faults are real: a full disk is a real file-size limit (RLIMIT_FSIZE) in a subprocess,
SIGTERM and SIGKILL are sent to a real preprocess process."""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data_pipeline
from data_pipeline import inspect as insp
from data_pipeline import merge as mg
from data_pipeline import preprocess as pp
from data_pipeline import train_tokenizer as tt
from data_pipeline.builtin_corpus import prepare_builtin_dataset
from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset, write_dataset
from data_pipeline.samples import CacheMismatch, GrowLengthSamples
from data_pipeline.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(data_pipeline.__file__)))


def _ignores_permissions():
    """True where this process writes into a read-only directory anyway (root with CAP_DAC_OVERRIDE)."""
    import tempfile
    d = tempfile.mkdtemp()
    os.chmod(d, 0o555)
    try:
        open(os.path.join(d, "probe"), "w").close()
        return True
    except PermissionError:
        return False
    finally:
        os.chmod(d, 0o755)
        shutil.rmtree(d)


# --- helpers ---------------------------------------------------------------------------------------------------
def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write((t if t.startswith("{") else json.dumps({"text": t})) + "\n")
    return str(path)


def snapshot(directory):
    """{relative path: bytes} of every file under `directory` (what "nothing lost" compares)."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out


def cli(main, argv, capsys):
    """Run a CLI in-process: (exit status, stderr). A traceback would surface as an exception here."""
    rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, pattern, status=2):
    assert rc == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


def run_module(module, args, fsize_limit=None, **kw):
    """`python -m module args` in a subprocess importing this checkout; with fsize_limit, writes past that many
    bytes of any file fail with EFBIG (what a full disk looks like to the writer: a failing write)."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module] + list(args), env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if fsize_limit else None, **kw)


@pytest.fixture
def small_out(tmp_path, sp_model):
    """An existing dataset `out` (2 documents) that every failing run below must leave byte-identical."""
    src = write_jsonl(tmp_path / "small.jsonl", ["first", "second"])
    out = str(tmp_path / "out")
    pp.preprocess([src], out, sp_model, quiet=True)
    return out


def big_corpus(path, n=3000):
    """~3 MB of text: long enough that a run is still encoding when a signal arrives."""
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing".split()
    rng = np.random.default_rng(0)
    return write_jsonl(path, [" ".join(rng.choice(words, 180)) for _ in range(n)])


# --- preprocess: input ------------------------------------------------------------------------------------------
def test_preprocess_lone_surrogate_named_and_skipped(tmp_path, sp_model, capsys):
    src = tmp_path / "sur.jsonl"
    src.write_text('{"text": "emoji pair \\ud83d\\ude00 is fine"}\n{"text": "lone \\ud800 is not"}\n',
                   encoding="ascii")
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", sp_model,
            "--no-progress"]
    assert_one_line_error(*cli(pp.main, argv, capsys),
                          r"sur\.jsonl:2: key 'text' holds a lone UTF-16 surrogate \\ud800 at character 6, which "
                          r"is not Unicode text; fix the line or pass --skip-bad-lines")
    assert sorted(os.listdir(tmp_path)) == ["sur.jsonl"]
    rc, err = cli(pp.main, argv + ["--skip-bad-lines"], capsys)
    assert rc == 0 and "1 documents" in err and "1 bad lines" in err and "sur.jsonl:2: key 'text' holds" in err
    ds = IndexedDataset(str(tmp_path / "o"))
    assert Tokenizer(sp_model).decode(ds.document(0)[:-1]) == "emoji pair \U0001F600 is fine"


def test_preprocess_byte_order_mark_is_not_text(tmp_path, sp_model):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "after a BOM"}\n')
    pp.preprocess([str(src)], str(tmp_path / "o"), sp_model, quiet=True)
    ds = IndexedDataset(str(tmp_path / "o"))
    assert Tokenizer(sp_model).decode(ds.document(0)[:-1]) == "after a BOM"


def test_preprocess_truncated_or_fake_gz(tmp_path, sp_model, small_out, corpus_jsonl, capsys):
    whole = gzip.compress(open(corpus_jsonl, "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    shutil.copy(corpus_jsonl, tmp_path / "plain.jsonl.gz")
    before = snapshot(tmp_path)
    for name, pattern in [("cut.jsonl.gz", r"cut\.jsonl\.gz: truncated or corrupt gzip data after line \d+ "
                                           r"\(Compressed file ended .*\); the file is incomplete"),
                          ("plain.jsonl.gz", r"plain\.jsonl\.gz: not a gzip file .*; rename it without \.gz")]:
        argv = ["--input", str(tmp_path / name), "--output-prefix", small_out, "--tokenizer-model", sp_model,
                "--no-progress", "--skip-bad-lines"]  # a truncated file is never a skippable bad line
        assert_one_line_error(*cli(pp.main, argv, capsys), pattern)
    assert snapshot(tmp_path) == before


def test_preprocess_same_input_twice(tmp_path, sp_model, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", ["one"])
    os.link(src, tmp_path / "link.jsonl")
    monkeypatch.chdir(tmp_path)
    for second in ["./a.jsonl", str(tmp_path / "link.jsonl")]:
        argv = ["--input", "a.jsonl", second, "--output-prefix", "o", "--tokenizer-model", sp_model]
        assert_one_line_error(*cli(pp.main, argv, capsys),
                              rf"--input {second}: the same file as a\.jsonl, given twice \(its documents would be "
                              rf"duplicated\); give each input once")
    assert not os.path.exists("o.bin")


@pytest.mark.parametrize("make, extra, pattern", [
    (lambda d: os.mkdir(d / "in.jsonl"), [], r"--input .*in\.jsonl: a directory with no input in it; it should "
                                              r"hold \.jsonl/\.json \(one JSON object per line\)"),
    (lambda d: (d / "in.jsonl").write_text(""), [], r"--input .*in\.jsonl: no documents: 0 lines, 0 empty, 0 bad; "
                                                     r"nothing written"),
    (lambda d: (d / "in.jsonl").write_text('{"text": " "}\n\n'), [], r"no documents: 2 lines, 2 empty, 0 bad"),
    (lambda d: (d / "in.jsonl").write_text('{"body": "x"}\n'), ["--skip-bad-lines"],
     r"no documents: 1 lines, 0 empty, 1 bad \(e\.g\. .*in\.jsonl:1: key 'text' missing .*\); nothing written\. "
     r"Check the files and --json-keys text"),
    (lambda d: (d / "in.jsonl").write_text('{"text": "x"}\n'), ["--json-keys", ""],
     r"--json-keys '': empty; give the JSON key"),
])
def test_preprocess_input_errors(tmp_path, sp_model, small_out, capsys, make, extra, pattern):
    make(tmp_path)
    before = snapshot(tmp_path)
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", small_out, "--tokenizer-model", sp_model,
            "--no-progress"] + extra
    assert_one_line_error(*cli(pp.main, argv, capsys), pattern)
    assert snapshot(tmp_path) == before


# --- preprocess: output -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, pattern", [
    ("", r"--output-prefix '': empty"),
    ("sub/", r"--output-prefix sub/: names a directory, not a file prefix; give e\.g\. sub/corpus"),
    ("afile/x", r"--output-prefix afile/x: .*afile is a file, not a directory; choose another --output-prefix"),
    ("afile/deeper/x", r"--output-prefix afile/deeper/x: .*afile is a file, not a directory"),
    ("x.bin", r"--output-prefix x\.bin: ends with \.bin \(it would write x\.bin\.bin\); give the prefix without the "
              r"extension: x"),
    ("taken", r"--output-prefix taken: taken\.idx is a directory; remove it or choose another --output-prefix"),
])
def test_preprocess_output_prefix_errors(tmp_path, sp_model, corpus_jsonl, capsys, monkeypatch, prefix, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    os.mkdir(tmp_path / "sub")
    os.mkdir(tmp_path / "taken.idx")
    before = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    argv = ["--input", corpus_jsonl, "--output-prefix", prefix, "--tokenizer-model", sp_model, "--no-progress"]
    assert_one_line_error(*cli(pp.main, argv, capsys), pattern)
    assert (snapshot(tmp_path), sorted(os.listdir(tmp_path))) == before


def test_preprocess_full_disk_keeps_existing_output(spawns, tmp_path, sp_model, corpus_jsonl, small_out):
    before = snapshot(tmp_path)
    r = run_module("data_pipeline.preprocess", ["--input", corpus_jsonl, "--output-prefix", small_out,
                                                "--tokenizer-model", sp_model, "--no-progress"], fsize_limit=16384)
    assert_one_line_error(r.returncode, r.stderr, r"out\.bin\.tmp-\d+: cannot write \(File too large\); free disk "
                                                  r"space \(or raise the quota / `ulimit -f`\)")
    assert snapshot(tmp_path) == before  # the old dataset intact, no temporary file left


@pytest.mark.skipif(_ignores_permissions(), reason="this user writes into read-only directories (root)")
def test_preprocess_read_only_directory(tmp_path, sp_model, corpus_jsonl, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    write_dataset(str(ro / "out"), [[5, 2]])
    before = snapshot(tmp_path)
    ro.chmod(0o555)
    try:
        for prefix in [ro / "out", ro / "new" / "x"]:
            argv = ["--input", corpus_jsonl, "--output-prefix", str(prefix), "--tokenizer-model", sp_model]
            assert_one_line_error(*cli(pp.main, argv, capsys), r"cannot write in .*ro \(Permission denied\); choose "
                                                               r"a directory you can write to")
    finally:
        ro.chmod(0o755)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(_ignores_permissions(), reason="this user reads unreadable files (root)")
def test_unreadable_files_named(tmp_path, sp_model, capsys):
    src = write_jsonl(tmp_path / "secret.jsonl", ["x"])
    ds = write_dataset(str(tmp_path / "ds"), [[5, 2]])
    for path in (src, ds + ".idx"):
        os.chmod(path, 0)
    try:
        argv = ["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", sp_model]
        assert_one_line_error(*cli(pp.main, argv, capsys), r"--input .*secret\.jsonl: not readable \(permission "
                                                           r"denied\); fix its permissions")
        assert_one_line_error(*cli(insp.main, [ds], capsys), r"ds\.idx: not readable \(permission denied\)")
        with pytest.raises(DatasetError, match=r"ds\.idx: cannot read \(Permission denied\); fix its permissions"):
            IndexedDataset(ds)
    finally:
        for path in (src, ds + ".idx"):
            os.chmod(path, 0o644)


def _start_preprocess(src, out, sp_model):
    """A real preprocess process, returned once it has created its temporary .bin (it is then mid-run)."""
    p = subprocess.Popen([sys.executable, "-m", "data_pipeline.preprocess", "--input", src, "--output-prefix", out,
                          "--tokenizer-model", sp_model, "--workers", "1", "--no-progress"],
                         env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE, text=True)
    tmp = f"{out}.bin.tmp-{p.pid}"
    deadline = time.time() + 120
    while not os.path.exists(tmp):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGSTOP)  # hold it mid-run: the signal below cannot race the end of the run
    return p, tmp


def test_preprocess_sigterm_removes_its_temp_files(spawns, tmp_path, sp_model, small_out):
    src = big_corpus(tmp_path / "big.jsonl")
    before = snapshot(tmp_path)
    p, tmp = _start_preprocess(src, small_out, sp_model)
    os.kill(p.pid, signal.SIGTERM)
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in err
    assert "interrupted (SIGTERM): " in err and "out.bin/.idx not written (an existing one is unchanged)" in err
    assert snapshot(tmp_path) == before


def test_preprocess_removes_temp_files_of_killed_runs_only(spawns, tmp_path, sp_model, small_out, caplog):
    src = big_corpus(tmp_path / "big.jsonl", n=400)
    p, dead_tmp = _start_preprocess(src, small_out, sp_model)
    p.kill()
    p.communicate(timeout=60)
    assert os.path.exists(dead_tmp)  # SIGKILL cannot be caught: the file stays behind
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live_tmp = f"{small_out}.idx.tmp-{live.pid}"
        open(live_tmp, "wb").write(b"another run is writing this")
        pp.preprocess([src], small_out, sp_model, quiet=True)
        assert not os.path.exists(dead_tmp) and open(live_tmp, "rb").read() == b"another run is writing this"
        assert f"removed {dead_tmp}, left by a stopped run (pid {p.pid})" in caplog.text
    finally:
        live.kill()
        live.wait()
    assert IndexedDataset(small_out).num_documents == 400


# --- train_tokenizer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, pattern", [
    (["--vocab-size", "259"], r"--vocab-size 259: too small; byte fallback alone needs 256 \+ 4"),
    (["--vocab-size", str(2**31)], r"--vocab-size 2147483648: too large \(sentencepiece's limit is 2\*\*31 - 1\)"),
    (["--workers", "0"], r"--workers 0: must be in \[1, 1024\]"),
    (["--seed", "-1"], r"--seed -1: must be in \[0, 2\*\*32\)"),
    (["--input-sentence-size", "-5"], r"--input-sentence-size -5: must be >= 0 \(0 = every line\)"),
    (["--character-coverage", "0.5"], r"--character-coverage 0\.5: sentencepiece accepts \[0\.98, 1\.0\]"),
    (["--json-keys", ""], r"--json-keys '': empty"),
    (["--json-keys", "nope"], r"corpus\.jsonl:1: key 'nope' missing .*choose the key with --json-keys"),
    (["--json-keys", "nope", "--skip-bad-lines"], r"--input .*corpus\.jsonl: no training text: 45 lines, 45 "
                              r"unreadable \(e\.g\. .*corpus\.jsonl:1: key 'nope' missing .*\); check the files"),
    (["--model-prefix", ""], r"--model-prefix '': empty"),
    (["--model-prefix", "afile/tok"], r"--model-prefix afile/tok: .*afile is a file, not a directory"),
    (["--model-prefix", "tok.model"], r"--model-prefix tok\.model: ends with \.model"),
    (["--model-prefix", "d/"], r"--model-prefix d/: names a directory"),
])
def test_train_tokenizer_argument_errors(tmp_path, corpus_jsonl, capsys, monkeypatch, extra, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    before = snapshot(tmp_path)
    argv = ["--input", corpus_jsonl, "--model-prefix", "tok", "--vocab-size", "300", "--quiet"] + extra
    assert_one_line_error(*cli(tt.main, argv, capsys), pattern)
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["afile"]


def test_train_tokenizer_unreadable_input_is_named(tmp_path, corpus_jsonl, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    whole = gzip.compress(open(corpus_jsonl, "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    for name, pattern in [("empty.jsonl", r"--input .*empty\.jsonl: no training text: 0 lines, 0 unreadable"),
                          ("cut.jsonl.gz", r"cut\.jsonl\.gz: truncated or corrupt gzip data after line \d+")]:
        argv = ["--input", str(tmp_path / name), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300",
                "--quiet"]
        assert_one_line_error(*cli(tt.main, argv, capsys), pattern)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("tok")]


def test_train_tokenizer_full_disk_keeps_existing_model(spawns, tmp_path, corpus_jsonl):
    prefix = str(tmp_path / "tok")
    tt.train_tokenizer([corpus_jsonl], prefix, vocab_size=500, num_threads=1, quiet=True)
    before = snapshot(tmp_path)
    r = run_module("data_pipeline.train_tokenizer", ["--input", corpus_jsonl, "--model-prefix", prefix,
                                                     "--vocab-size", "600", "--workers", "1", "--quiet"],
                   fsize_limit=1024)
    assert_one_line_error(r.returncode, r.stderr, r"tok\.(vocab|model)\.tmp-\d+: cannot write \(File too large\)")
    assert snapshot(tmp_path) == before  # the old .model/.vocab pair, no temporary file


# --- merge ------------------------------------------------------------------------------------------------------
def test_merge_refuses_the_same_dataset_twice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset("a", [[5, 6, 2]])
    write_dataset("b", [[7, 2]])
    os.symlink("a.idx", "alias.idx")
    os.symlink("a.bin", "alias.bin")
    before = snapshot(tmp_path)
    for inputs, pattern in [(["a", "a"], r"--input a: the same dataset as a, given twice"),
                            (["a", "b", "./a"], r"--input \./a: the same dataset as a, given twice \(its documents "
                                                r"would be duplicated\); give each input once"),
                            (["alias", "a"], r"--input a: the same dataset as alias, given twice")]:
        assert_one_line_error(*cli(mg.main, ["--input", *inputs, "--output-prefix", "m"], capsys), pattern)
    for out in ["./a", "alias"]:
        assert_one_line_error(*cli(mg.main, ["--input", "a", "b", "--output-prefix", out], capsys),
                              rf"--output-prefix {out}: is also an input \(a\), which it would overwrite")
    assert_one_line_error(*cli(mg.main, ["--input", "a", "b", "--output-prefix", "m.idx"], capsys),
                          r"--output-prefix m\.idx: ends with \.idx")
    assert snapshot(tmp_path) == before


def test_merge_full_disk_keeps_existing_output(spawns, tmp_path):
    a = write_dataset(str(tmp_path / "a"), [np.arange(20000) % 500])
    b = write_dataset(str(tmp_path / "b"), [np.arange(20000) % 300])
    write_dataset(str(tmp_path / "m"), [[1, 2]])
    before = snapshot(tmp_path)
    r = run_module("data_pipeline.merge", ["--input", a, b, "--output-prefix", str(tmp_path / "m")],
                   fsize_limit=50000)
    assert_one_line_error(r.returncode, r.stderr, r"m\.bin\.tmp-\d+: cannot write \(File too large\)")
    assert snapshot(tmp_path) == before


# --- inspect ----------------------------------------------------------------------------------------------------
def test_inspect_usage_errors_exit_2(tmp_path, sp_model, capsys):
    p = write_dataset(str(tmp_path / "d" / "v"), [[5, 2]])
    os.remove(p + ".bin")
    cases = [([p], r"v\.bin: file not found; create the dataset with"),
             ([str(tmp_path / "d")], r"d\.idx: file not found \(.*d is a directory; pass the prefix of a dataset in "
                                     r"it: .*d/v\)"),
             ([p, "--vocab-size", "0"], r"--vocab-size 0: must be a positive number of ids"),
             ([p, "--vocab-size", "9", "--tokenizer-model", sp_model], r"--vocab-size 9 and --tokenizer-model .*: "
                                                                       r"give one")]
    for argv, pattern in cases:
        assert_one_line_error(*cli(insp.main, argv, capsys), pattern)


def test_inspect_damaged_dataset_exit_1(tmp_path, sp_model, capsys):
    big = write_dataset(str(tmp_path / "big"), [[1999, 5, 2], [3, 2]])
    rc = insp.main([big, "--tokenizer-model", sp_model])  # ids past the tokenizer: reported, not a decode crash
    out, err = capsys.readouterr()
    assert "first document not decoded: it holds ids outside the tokenizer's [0, 1000)" in out
    assert_one_line_error(rc, err, r"INVALID: .*big\.bin: token id 1999 at token 0 \(document 0\) is outside the "
                                   r"vocabulary \[0, 1000\)", status=1)
    flt = write_dataset(str(tmp_path / "flt"), [[1.5, 2.0]], np.float32)
    assert_one_line_error(*cli(insp.main, [flt, "--vocab-size", "10"], capsys),
                          r"INVALID: .*flt\.idx: token dtype float32 is not an integer type", status=1)
    code = write_dataset(str(tmp_path / "code"), [[5, 2]])
    raw = bytearray(open(code + ".idx", "rb").read())
    raw[17] = 9
    open(code + ".idx", "wb").write(bytes(raw))
    assert_one_line_error(*cli(insp.main, [code], capsys), r"INVALID: .*code\.idx: unknown dtype code 9", status=1)


def test_inspect_closed_pipe_is_quiet(spawns, tokenized):
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    r = subprocess.run([sys.executable, "-m", "data_pipeline.inspect", tokenized], stdout=w_fd,
                       stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    os.close(w_fd)
    assert (r.returncode, r.stderr) == (141, "")


def test_dataset_file_that_is_a_directory(tmp_path):
    p = write_dataset(str(tmp_path / "v"), [[5, 2]])
    os.remove(p + ".idx")
    os.mkdir(p + ".idx")
    with pytest.raises(DatasetError, match=r"v\.idx: is a directory, not the dataset's file"):
        IndexedDataset(p)


# --- sample index cache -----------------------------------------------------------------------------------------
@pytest.fixture
def cached(tmp_path):
    docs = [[1000 + 100 * d + j for j in range(d % 7 + 2)] for d in range(40)]
    prefix = write_dataset(str(tmp_path / "many"), docs)
    plan = [(2, 40), (4, 40)]
    cache = str(tmp_path / "cache")
    s = GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache).build()
    reference = GrowLengthSamples(prefix, plan, seed=5)  # in memory, never cached
    return prefix, plan, cache, s.cache_path, reference


def _tamper(path, array):
    np.save(path, array)  # a valid .npy: only the checksum and the invariants can tell


@pytest.mark.parametrize("tamper, pattern", [
    (lambda c: _tamper(os.path.join(c, "stream_docs.npy"),
                       np.zeros_like(np.load(os.path.join(c, "stream_docs.npy")))),  # "trained on one document"
     r"stream_docs\.npy checksum differs from the one recorded when it was built"),
    (lambda c: _tamper(os.path.join(c, "order_1.npy"), np.load(os.path.join(c, "order_1.npy"))[::-1].copy()),
     r"order_1\.npy checksum differs"),
    (lambda c: _tamper(os.path.join(c, "order_0.npy"), np.arange(7, dtype=np.int32)),
     r"order_0\.npy is int32\[7\], expected integers of shape \[20\]"),
    (lambda c: _tamper(os.path.join(c, "stream_cum.npy"), np.load(os.path.join(c, "stream_cum.npy")) + 1),
     r"stream_cum runs from 1 to \d+, expected 0 to \d+"),
    (lambda c: json.dump({**json.load(open(os.path.join(c, "meta.json"))), "seed": 6},
                         open(os.path.join(c, "meta.json"), "w")),
     r"meta\.json seed 6, expected 5"),
    (lambda c: json.dump({k: v for k, v in json.load(open(os.path.join(c, "meta.json"))).items() if k != "arrays"},
                         open(os.path.join(c, "meta.json"), "w")),  # a cache written before checksums existed
     r"meta\.json: unreadable cached sample index meta \(KeyError: 'arrays'\)"),
])
def test_tampered_index_cache_refused_by_load_rebuilt_by_build(cached, caplog, tamper, pattern):
    prefix, plan, cache, path, reference = cached
    tamper(path)
    with pytest.raises(CacheMismatch, match=pattern + r".*; delete .* and rebuild \(rank 0's build\(\) does\)"):
        GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache).load()
    rebuilt = GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache).build()
    assert "rebuilding it" in caplog.text
    other_rank = GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache).load()  # now verifies
    for k in range(len(plan)):
        n = reference.num_samples(k)
        assert np.array_equal(other_rank.samples(k, np.arange(n)), reference.samples(k, np.arange(n)))
        assert np.array_equal(rebuilt.samples(k, np.arange(n)), reference.samples(k, np.arange(n)))
    assert os.listdir(cache) == [os.path.basename(path)]  # the bad copy is gone, no temp directories


def test_index_cache_dir_errors_and_stale_builds(cached, tmp_path):
    prefix, plan, cache, path, _ = cached
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match=r"sample index cache_dir .*afile: .*afile: cannot write \(.*\); .*\(set "
                                           r"data\.cache_dir to another directory\)"):
        GrowLengthSamples(prefix, plan, seed=6, cache_dir=str(tmp_path / "afile")).build()
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    stale = f"{path}.tmp-{dead.pid}-bad"
    mine = f"{path}.tmp-{os.getpid()}"
    os.mkdir(stale)
    os.mkdir(mine)
    GrowLengthSamples(prefix, plan, seed=7, cache_dir=cache).build()
    assert not os.path.exists(stale) and os.path.isdir(mine)  # a live process's build is never touched


# --- built-in corpus --------------------------------------------------------------------------------------------
def test_builtin_dataset_rebuilds_damaged_files(tmp_path, sp_model, corpus_jsonl, caplog):
    out = tmp_path / "builtin"
    out.mkdir()
    # a small stand-in corpus and its tokenizer, so that only the damaged dataset has to be rebuilt (fast)
    shutil.copy(corpus_jsonl, out / "builtin.jsonl")
    shutil.copy(sp_model, out / "tokenizer-1000.model")
    write_dataset(str(out / "builtin-1000"), [[5, 2]] * 3)
    with open(out / "builtin-1000.bin", "r+b") as f:
        f.truncate(4)
    model, prefix = prepare_builtin_dataset(str(out), vocab_size=1000)
    assert "rebuilding " in caplog.text and "builtin-1000.bin: truncated" in caplog.text
    assert IndexedDataset(prefix).num_documents == 45 and open(model, "rb").read() == open(sp_model, "rb").read()
    open(out / "tokenizer-1000.model", "wb").write(b"not a model")  # a damaged tokenizer is retrained
    model, prefix = prepare_builtin_dataset(str(out), vocab_size=1000)
    assert "tokenizer-1000.model); give a sentencepiece .model" in caplog.text and Tokenizer(model).vocab_size == 1000
    assert IndexedDataset(prefix).num_documents == 45
    with pytest.raises(DatasetError, match=r"built-in dataset directory .*afile: is a file; choose another "
                                           r"directory \(data\.builtin_dir\)"):
        (tmp_path / "afile").write_text("x")
        prepare_builtin_dataset(str(tmp_path / "afile"), vocab_size=1000)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe-bytelevel"])
def test_train_tokenizer_refuses_a_mostly_unreadable_input(tmp_path, capsys, kind):
    """39 of 40 lines unreadable: never a tokenizer of the one good line. Without --skip-bad-lines the first bad line
    is named; with it, the counts (at most half may be unreadable); nothing is written either way."""
    from data_pipeline import train_tokenizer as tt
    good = "The quick brown fox jumps over the lazy dog. " * 40
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(["{broken json"] * 20 + [json.dumps({"text": good})] + ["{broken"] * 19) + "\n")
    out = tmp_path / "tok"
    args = ["--input", str(corpus), "--model-prefix", str(out), "--vocab-size", "300", "--type", kind, "--quiet"]
    assert tt.main(args) == 2
    err = capsys.readouterr().err
    assert "c.jsonl:1: " in err and "--skip-bad-lines" in err and len(err.strip().splitlines()) == 1
    assert tt.main(args + ["--skip-bad-lines"]) == 2
    err = capsys.readouterr().err
    assert "39 of 40 lines are unreadable" in err and "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
