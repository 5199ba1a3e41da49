"""The shipped DeepSpeed configs: what they set, that each loads through the launcher's checks and trains a step on
CPU (real DeepSpeed, in process), the CPU Adam fallback, and the allocator setting the launcher leaves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import distributed
from launcher import engine as ds
from launcher.ds_config import load_ds_config
from launcher.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("zero1", "zero2", "zero2_offload")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_settings(name):
    cfg = load_ds_config(str(ROOT / f"ds_configs/{name}.json"))
    assert cfg["bf16"]["enabled"] is True
    assert cfg["communication_data_type"] == "fp32" and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    assert cfg["zero_optimization"]["overlap_comm"] is True
    # offload: DeepSpeed's CPU Adam (no torch_adam); on the GPU torch's AdamW (no JIT-built FusedAdam)
    assert ds.uses_cpu_adam(cfg) is (name == "zero2_offload")
    assert cfg["optimizer"]["params"].get("torch_adam", False) is (name != "zero2_offload")


# DeepSpeed's CPU Adam: its op builder asks py-cpuinfo in a Python subprocess, and builds the op on first use
@pytest.mark.parametrize("name, optimizer", [("zero1", "BF16_Optimizer|AdamW"), ("zero2", "AdamW"),
                                             pytest.param("zero2_offload", "DeepSpeedCPUAdam", marks=pytest.mark.slow)])
def test_shipped_config_trains_a_step_on_cpu(run, monkeypatch, name, optimizer):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    code, out = run("growlength.stages=[{seq_len: 32, tokens: 1024}]", "data.valid_fraction=0",
                    ds_config=str(ROOT / f"ds_configs/{name}.json"))
    assert code == 0, out
    steps = [r for r in read_metrics(run.run_dir) if "kind" not in r]
    assert len(steps) == 1 and steps[0]["loss"] > 0
    line = next(line for line in out.splitlines() if " optimizer " in line)
    assert any(o in line for o in optimizer.split("|")), line
    resolved = json.loads((run.run_dir / "ds_config.resolved.json").read_text())
    assert resolved["communication_data_type"] == "fp32"
    # the environment the launcher leaves: expandable segments, since shapes change at every stage
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_allocator_setting_keeps_the_users(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    distributed.set_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # torch's newer name counts as set
    distributed.set_allocator_defaults()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    distributed.set_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_allocator_set_before_cuda_in_a_fresh_launcher_process(spawns, tmp_path):
    """The variable is in the environment as soon as the process group exists: before any CUDA call of the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    code = ("import os, torch; from launcher import engine as ds; ds.init_distributed(); "
            "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'], torch.cuda.is_initialized()); ds.close()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["expandable_segments:True", "False"]


def test_cpu_adam_fallback_when_it_cannot_build(spawns, tmp_path):
    """A machine where DeepSpeed's CPU Adam cannot compile (here: no usable C++ compiler) trains with torch's AdamW
    and says why; a fresh extensions directory forces a real build attempt."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = ("import json, logging; logging.basicConfig(level=logging.WARNING); from launcher import engine as ds; "
            f"cfg = json.load(open({str(ROOT / 'ds_configs/zero2_offload.json')!r})); "
            "out = ds.cpu_adam_or_fallback(cfg); print(json.dumps(out['optimizer']['params'].get('torch_adam')), "
            "json.dumps(cfg['optimizer']['params'].get('torch_adam')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["true", "null"]  # the fallback, and the caller's dict untouched
    assert "DeepSpeed's CPU Adam could not be built here" in proc.stderr and "torch's AdamW" in proc.stderr


def test_timeout_setting_errors(monkeypatch, capsys):
    monkeypatch.setenv("GROWLENGTH_RANK0_TIMEOUT_MIN", "0.5")
    assert distributed.timeout_setting(distributed.RANK0_TIMEOUT).total_seconds() == 30
    for bad in ("abc", "0", "-3", "inf"):
        monkeypatch.setenv("GROWLENGTH_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(SystemExit) as e:
            distributed.timeout_setting(distributed.DIST_TIMEOUT)
        assert e.value.code == 2
        assert (f"error: GROWLENGTH_DIST_TIMEOUT_MIN='{bad}': must be a positive number of minutes (default 30)"
                in capsys.readouterr().err)


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce_scatter", "reduce_scatter_tensor", "all_gather",
               "all_gather_into_tensor", "reduce", "broadcast")


def _collectives_per_micro_batch(rank, world, name, accum):
    """Collective calls during each micro-batch (forward + backward) and each engine.step() of 2 optimizer steps of
    ``accum`` micro-batches, through the shipped config ``name`` filled as the launcher fills it."""
    import torch
    import torch.distributed as tdist

    from launcher.optim import param_groups
    from model import CausalLM, ModelConfig

    counts = []
    for fn in COLLECTIVES:  # before the engine exists: DeepSpeed keeps references to some of them
        def counted(*args, _fn=getattr(tdist, fn), **kwargs):
            if counts:
                counts[-1] += 1
            return _fn(*args, **kwargs)
        setattr(tdist, fn, counted)
    cfg = {k: v for k, v in load_ds_config(str(ROOT / f"ds_configs/{name}.json")).items() if k != "scheduler"}
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=accum, train_batch_size=2 * accum * world)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=128))
    engine = ds.create_engine(model, cfg, param_groups(model))
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        for i in range(accum):
            counts.append(0)
            ds.set_accumulation_boundary(engine, i == accum - 1)
            engine.backward(engine(x[:, :-1], labels=x[:, 1:]))
        counts.append(0)
        engine.step()
    return counts


@pytest.mark.parametrize("name, reduces_every_micro_batch", [("zero1", False), ("zero2", True)])
def test_zero1_communicates_once_per_step_and_zero2_every_micro_batch(name, reduces_every_micro_batch,
                                                                      run_distributed):
    """What docs/ds-configs.md's size table rests on: under accumulation, ZeRO-2 reduces every micro-batch's
    gradients (and on a GPU synchronises after each one, overlap_comm), ZeRO-1 (bf16 with fp32 accumulation:
    DeepSpeed's BF16_Optimizer) only after the step's last micro-batch. 2 ranks on gloo, 2 steps x 4 micro-batches."""
    counts = run_distributed(_collectives_per_micro_batch, 2, name, 4)[0]
    inner = [c for step in (counts[0:3], counts[5:8]) for c in step]  # the micro-batches before each boundary
    assert (min(inner) > 0) if reduces_every_micro_batch else (inner == [0] * 6), counts
    assert counts[3] + counts[4] > 0 and counts[8] + counts[9] > 0, counts  # each step's gradients are reduced
