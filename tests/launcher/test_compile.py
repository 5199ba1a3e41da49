"""model.compile: one static graph per stage length, built at the switch, on the real launcher, engine and inductor.

A compiled two-stage run (with activation checkpointing) trains exactly as the eager one does in fp32, reports its
compile seconds per stage and recompiles nothing within a stage. A machine whose C++ compiler is missing or broken
(inductor's own ``cpp.cxx`` setting pointed elsewhere, a real failure) stops ``compile: true`` with one line and
trains ``compile: auto`` eager with one warning. bf16 builds on CPU (the model's bias formulation, model/gpt_neox.py).
"""
import json

import pytest
import torch
import torch._dynamo
from torch._inductor import config as inductor_config

from launcher import compile as compiling
from launcher.metrics import read_metrics
from model import CausalLM, ModelConfig

from launching import ZERO2

TWO_STAGES = "growlength.stages=[{seq_len: 16, tokens: 2048}, {seq_len: 32, tokens: 2048}]"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    compiling._warned.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def fp32_config(tmp_path_factory):
    cfg = json.loads(ZERO2.read_text())
    cfg["bf16"] = {"enabled": False}
    path = tmp_path_factory.mktemp("ds") / "zero2_fp32.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def records(run_dir):
    got = read_metrics(run_dir)
    return [r for r in got if "kind" not in r], [r for r in got if r.get("kind") == "stage"]


@pytest.mark.slow  # inductor builds each graph with the C++ compiler
@pytest.mark.parametrize("masking", ["false", "true"])
def test_compiled_stages_train_as_eager_and_report_compile_time(run, fp32_config, tmp_path, masking):
    """With activation checkpointing and ZeRO-2, and with document masking (the block's graph then takes the
    window's block-causal mask)."""
    common = ("growlength.tokens_per_step=512", TWO_STAGES, "model.activation_checkpointing=true",
              "logging.log_interval=1", "optimisation.warmup_steps=1", f"model.document_masking={masking}")
    code, out = run(*common, "model.compile=true", ds_config=fp32_config)
    assert code == 0, out
    compiled_steps, compiled_stages = records(run.run_dir)
    assert "recompile 1 within" not in out and "stage 0: 0 recompile(s) during training" in out, out
    assert all(s["compile"] is True and s["compile_s"] > 0 for s in compiled_stages), compiled_stages
    assert "compiled in" in out

    eager_dir = tmp_path / "eager"
    code, out = run(*common, f"run_dir={eager_dir}", ds_config=fp32_config)
    assert code == 0, out
    eager_steps, eager_stages = records(eager_dir)
    assert [s["compile"] for s in eager_stages] == [False, False]
    assert [r["seq_len"] for r in compiled_steps] == [r["seq_len"] for r in eager_steps] == [16] * 4 + [32] * 4
    for c, e in zip(compiled_steps, eager_steps):  # fused kernels reorder fp32 sums: rounding only
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4), (c["step"], c["loss"], e["loss"])


@pytest.mark.slow
def test_recompile_within_a_stage_is_counted(caplog):
    m = CausalLM(ModelConfig.from_preset("tiny", vocab_size=128, attention="sdpa", num_layers=1))
    compiler = compiling.StageCompiler(m, True, torch.device("cpu"), torch.float32)
    stack, calls = m.blocks, []
    m.blocks = lambda x, cu_seqlens=None: calls.append(tuple(x.shape)) or stack(x, cu_seqlens)
    try:
        assert compiler.compile_stage(0, 2, 8) > 0
        assert calls == [(2, 8, 64)]  # the warm-up runs the model's own block loop, not a copy of it
        m(torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 8, dtype=torch.long)).backward()
        assert compiler.recompiles == 0 and len(calls) == 2  # the warm-up's graph served the real step
        m(torch.zeros(3, 8, dtype=torch.long), labels=torch.zeros(3, 8, dtype=torch.long)).backward()
        assert compiler.recompiles == 1 and "recompile 1 within stage 0" in caplog.text
        with torch.no_grad():
            m(torch.zeros(1, 8, dtype=torch.long))
        assert compiler.recompiles == 1 and compiler.eval_graphs == 1  # validation's graph is not a recompile
    finally:
        compiler.close()


@pytest.mark.slow
def test_bf16_builds_on_cpu():
    m = CausalLM(ModelConfig.from_preset("tiny", vocab_size=128, attention="sdpa", num_layers=1)).to(torch.bfloat16)
    compiler = compiling.StageCompiler(m, True, torch.device("cpu"), torch.bfloat16)
    try:
        assert compiler.compile_stage(0, 2, 8) > 0
    finally:
        compiler.close()


def test_compile_true_without_a_cxx_compiler_is_refused_at_start(run):
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        code, out = run("model.compile=true")
    assert code == 2, out
    assert "model.compile=true: inductor found no working C++ compiler" in out and "model.compile=false" in out
    assert "Traceback" not in out
    assert not (run.run_dir / "metrics.jsonl").exists()  # refused before any step


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path, spawns):
    """A "compiler" that answers --version and builds nothing: the C++ build fails for real. Fresh caches, so that
    nothing built earlier is loaded instead (inductor then checks the build in a Python subprocess)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    with inductor_config.patch({"cpp.cxx": (None, "true"), "fx_graph_cache": False}):
        yield


def test_compile_true_stops_when_the_build_fails(run, broken_compiler):
    code, out = run("model.compile=true")
    assert code == 2, out
    assert "model.compile=true: torch.compile (inductor) cannot build this model on cpu in bfloat16 at seq_len 32" \
        in out and "set model.compile=false" in out
    assert "Traceback" not in out


def test_compile_auto_trains_eager_with_one_warning(run, broken_compiler):
    code, out = run("model.compile=auto")
    assert code == 0, out
    assert out.count("model.compile=auto: torch.compile (inductor) cannot build") == 1, out
    steps, stages = records(run.run_dir)
    assert len(steps) == 2 and stages[0]["compile"] is False and stages[0]["compile_s"] is None
    assert "eager)" in out
