# Two entry points: `make demo` (the main job on the built-in corpus) and `make test` (the test suite).
# Each installs what it needs into a local virtual environment first, once.
#
# TORCH_SPEC pins the CPU build of torch that installs from local disk on the reference machine.
# On a GPU box install your CUDA torch instead:  make demo TORCH_SPEC="torch==2.5.1"  (or any spec pip accepts).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.growlength-installed
# DeepSpeed JIT-builds a small CPU communication op on first use; keep its cache with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-gpu install bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job: GrowLength on the tiny model and the built-in corpus (prepared on first use), 1 rank.
# Any key=value of the run config can follow: make demo ARGS="growlength.total_tokens=786432"
demo: $(STAMP)
	$(VENV)/bin/deepspeed launcher/pretrain.py --ds_config ds_configs/zero2.json $(ARGS)

# tests/cluster runs on a real SLURM cluster of two loopback nodes (+ Open MPI, sshd for pdsh): started here when
# root, skipped otherwise.
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then bash slurm/setup_local_cluster.sh; \
	else echo "make test: not root, so no local SLURM cluster is started; tests/cluster skip unless one is up"; fi
	$(PY) -m pytest -q -ra tests

# On a GPU machine (install your CUDA torch: TORCH_SPEC, and pip install -e .[gpu] for flash-attn): tests/gpu/, which
# run benchmarks/gpu_acceptance.py at full size (bounded to 8 min) and short CUDA kernel checks. `make test` skips them.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -ra tests/gpu

bench: $(STAMP)
	@echo "see docs/benchmarks.md"

clean:
	rm -rf $(VENV) runs .cache
