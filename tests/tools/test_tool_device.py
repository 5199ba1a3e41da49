"""Where the evidence tools compute (--device / --dtype) and runs saved with GPU-only settings, on the CPU.

A run trained here is rewritten to say it trained with ``attention: flash`` and ``deterministic_attention: true``
(what a GPU run records): evaluate and export still load it on a CPU box, and score and write the same model.
"""
import json
import shutil

import pytest
import torch

from evidence import compare, evaluate, export_hf
from evidence.runs import EvidenceError, compute_device

from test_tool_bad_input import STATE, snapshot, work  # noqa: F401 - the module's trained run


def as_if_trained_on_a_gpu(run):
    """Every checkpoint's saved model config says flash-attn and deterministic attention."""
    for state_file in run.glob(f"checkpoints/*/{STATE}"):
        state = json.loads(state_file.read_text())
        state["model"].update(attention="flash", deterministic_attention=True)
        state_file.write_text(json.dumps(state))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-box case: no CUDA")
def test_a_run_saved_with_flash_attention_evaluates_and_exports_on_the_cpu(work, tmp_path):  # noqa: F811
    plain = evaluate.evaluate(str(work / "run"), lengths=[32], tokens=256)
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    as_if_trained_on_a_gpu(run)
    report = evaluate.evaluate(str(run), lengths=[32], tokens=256)
    assert (report["device"], report["dtype"]) == ("cpu", "fp32")  # auto on a box without CUDA
    assert report["results"][0]["loss"] == plain["results"][0]["loss"]  # the same weights, the same windows
    assert export_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert export_hf.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf16"), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file
    fp32, bf16 = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "hf16"))
    assert {t.dtype for t in fp32.values()} == {torch.float32} and {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf = evaluate.evaluate(str(run), lengths=[32], tokens=256, dtype="bf16", device="cpu")
    assert bf["dtype"] == "bf16" and bf["results"][0]["loss"] == pytest.approx(plain["results"][0]["loss"], abs=0.02)


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device 'cuda:x': choose auto, cpu, cuda or cuda:N"),
    (["--dtype", "fp8"], "--dtype 'fp8': choose auto, fp32, bf16, fp16"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cuda"], "--device cuda: CUDA is not usable here (this torch is built without CUDA"
                           if torch.version.cuda is None else "--device cuda: CUDA is not usable here"),
]))
def test_bad_device_or_dtype_is_one_line_and_exit_2(work, tmp_path, caplog, flags, message):  # noqa: F811
    before = snapshot(work)
    tools = {"evaluate": lambda: evaluate.main(["--checkpoint", str(work / "run"), "--lengths", "32", *flags]),
             "export_hf": lambda: export_hf.main(["--checkpoint", str(work / "run"), "--out", str(tmp_path / "hf"),
                                                  *flags]),
             "compare": lambda: compare.main(["--budget-tokens", "4096", "--out", str(tmp_path / "cmp"), "--lengths",
                                              "32,64", "--shares", "0.5,0.5", "--tokens-per-step", "512", *flags])}
    for name, tool in tools.items():
        caplog.clear()
        assert tool() == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].startswith(message) and "\n" not in errors[0], (name, errors)
    assert snapshot(work) == before and not (tmp_path / "hf").exists() and not (tmp_path / "cmp").exists()


def test_auto_is_cuda_in_bf16_where_cuda_is_usable(monkeypatch):
    assert compute_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert compute_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_device() == (torch.device("cuda"), torch.bfloat16)
    assert compute_device("cuda:1", "fp32") == (torch.device("cuda:1"), torch.float32)
    with pytest.raises(EvidenceError, match=r"--device cuda:2: only 2 GPU\(s\) are visible; choose cuda:0 .. cuda:1"):
        compute_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4
    assert compute_device() == (torch.device("cuda"), torch.float32)
