"""The evidence tools check every number and output path before the work: a report that cannot be written or a
count of zero is one line naming the flag (exit 2), found before any measurement or run, and nothing is created."""
from pathlib import Path

import pytest

from evidence import bench_lengths, compare, downstream, evaluate
from evidence.runs import EvidenceError


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bench_lengths_refuses_an_unwritable_json_before_measuring(tmp_path, caplog, monkeypatch):
    (tmp_path / "afile").write_text("x")
    before = files(tmp_path)
    monkeypatch.setattr(bench_lengths, "bench", lambda *a, **k: pytest.fail("measured before checking --json"))
    assert bench_lengths.main(["--lengths", "32", "--json", str(tmp_path / "afile" / "report.json")]) == 2
    assert f"--json {tmp_path / 'afile' / 'report.json'}: {tmp_path / 'afile'} is a file, not a directory" \
        in caplog.text
    assert files(tmp_path) == before


def test_bench_lengths_names_json_when_the_write_itself_fails(tmp_path, caplog, monkeypatch):
    report = tmp_path / "report.json"
    (tmp_path / "dir.json").mkdir()
    monkeypatch.setattr(bench_lengths, "bench", lambda *a, **k: pytest.fail("measured before checking --json"))
    assert bench_lengths.main(["--lengths", "32", "--json", str(tmp_path / "dir.json")]) == 2
    assert f"--json {tmp_path / 'dir.json'} is a directory" in caplog.text

    def measure(*a, **k):  # the place goes away during the measurement
        report.mkdir()
        return {"lengths": []}
    monkeypatch.setattr(bench_lengths, "bench", measure)
    monkeypatch.setattr(bench_lengths, "table", lambda report: "")
    assert bench_lengths.main(["--lengths", "32", "--json", str(report)]) == 2
    assert f"{report}: cannot write it (Is a directory); choose another --json" in caplog.text


def test_compare_refuses_zero_points_before_any_run(tmp_path, caplog):
    rc = compare.main(["--budget-tokens", "4096", "--out", str(tmp_path / "cmp"), "--lengths", "32,64",
                       "--shares", "0.5,0.5", "--tokens-per-step", "512", "--points", "0"])
    assert rc == 2 and "--points 0: must be at least 1" in caplog.text
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("flag, value", [("--ranks", "0"), ("--tokens-per-step", "0"), ("--eval-tokens", "0")])
def test_compare_refuses_a_zero_count_before_any_run(tmp_path, caplog, flag, value):
    rc = compare.main(["--budget-tokens", "4096", "--out", str(tmp_path / "cmp"), "--lengths", "32,64",
                       "--shares", "0.5,0.5", "--tokens-per-step", "512", flag, value])
    assert rc == 2 and f"{flag} {value}: must be at least 1" in caplog.text
    assert not (tmp_path / "cmp").exists()


def test_the_other_tools_refuse_zero_counts_before_loading_anything(tmp_path):
    missing = str(tmp_path / "no-run")  # never opened: the numbers are checked first
    with pytest.raises(EvidenceError, match="^--tokens-per-batch 0: must be a positive number"):
        evaluate.evaluate(missing, lengths=[32], tokens_per_batch=0, device="cpu")
    with pytest.raises(EvidenceError, match="^--batch-size 0 --bootstrap-iters 100000: the batch size must be"):
        downstream.run(missing, "hellaswag", batch_size=0)
    with pytest.raises(EvidenceError, match="^--limit 0.0: must be positive"):
        downstream.run(missing, "hellaswag", limit=0.0)
    with pytest.raises(EvidenceError, match="^--vocab-size 0: must be at least 1"):
        bench_lengths.bench("tiny", [32], 256, vocab_size=0)
