# Two entry points: `make demo` (the main job on the built-in corpus) and `make test` (the test suite).
# Each installs what it needs into a local virtual environment first, once.
#
# TORCH_SPEC pins the CPU build of torch that installs from local disk on the reference machine.
# On a GPU box install your CUDA torch instead:  make test-gpu TORCH_SPEC="torch==2.13.0" \
#     TORCH_INDEX=https://download.pytorch.org/whl/cu130   (any spec pip accepts; the index of your CUDA version).
# A changed TORCH_SPEC or TORCH_INDEX reinstalls torch (the pair is recorded in $(VENV)/.growlength-torch).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.growlength-installed
TORCH_STAMP := $(VENV)/.growlength-torch
# DeepSpeed JIT-builds a small CPU communication op on first use; keep its cache with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-fast test-gpu install flash-attn bench clean FORCE

install: $(STAMP)

# rewritten only when the torch request changes, so that the stamp below is outdated exactly then
$(TORCH_STAMP): FORCE
	@mkdir -p $(VENV)
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH_SPEC) $(TORCH_INDEX)" ] || echo "$(TORCH_SPEC) $(TORCH_INDEX)" > $@

$(STAMP): setup.py Makefile $(TORCH_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(filter $(TORCH_STAMP),$?),$(PY) -m pip uninstall -q -y torch)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )"$(TORCH_SPEC)"
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

# The edit loop: every test that starts no process (pytest -m "not slow"; tests/conftest.py marks the others).
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

# On a GPU machine (install your CUDA torch: TORCH_SPEC/TORCH_INDEX above; flash-attn: docs/gpu.md): tests/gpu/, which
# run benchmarks/gpu_acceptance.py at full size (bounded to 8 min) and short CUDA kernel checks. `make test` skips them;
# here they fail when CUDA cannot be used: benchmarks/cuda_env.py prints the stack (torch, CUDA, driver, GPUs) first.
test-gpu: $(STAMP)
	$(PY) benchmarks/cuda_env.py
	$(PY) -m pytest -q -ra tests/gpu

# flash-attn 2 (optional; docs/gpu.md): it compiles against the torch in $(VENV), so pip must not build it in an
# isolated environment; where no prebuilt wheel matches this torch and CUDA it compiles (nvcc, tens of minutes).
FLASH_ATTN_SPEC ?= flash-attn
flash-attn: $(STAMP)
	$(PY) -m pip install -q ninja packaging
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation "$(FLASH_ATTN_SPEC)"
	$(PY) -c "import flash_attn; print('flash-attn', flash_attn.__version__)"

bench: $(STAMP)
	@echo "see docs/benchmarks.md"

clean:
	rm -rf $(VENV) runs .cache
