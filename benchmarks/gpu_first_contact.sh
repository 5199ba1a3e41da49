#!/usr/bin/env bash
# The first run on a GPU machine, one command from the repository root (docs/gpu.md, "First contact"):
#
#     bash benchmarks/gpu_first_contact.sh          # results under $OUT (default runs/first-contact)
#
# 1. the environment: nvidia-smi, benchmarks/cuda_env.py (torch, CUDA, cuDNN, NCCL, driver, GPUs, library versions);
#    stops here (exit 1) when CUDA cannot be used
# 2. the CUDA kernel tests, tests/gpu/test_cuda_kernels.py, bounded by KERNEL_TESTS_S (default 60 s)
# 3. the acceptance run, benchmarks/gpu_acceptance.py --timeout-s ACCEPTANCE_S (default 300 s): its table, its JSON
#    and the small files of its work directory (logs, JSON, reports; no checkpoints) are copied to $OUT
# The whole stays under about 6.5 minutes, so that a second run fits in a 15-minute slot with its start-up.
# Exit: the acceptance's (0 every check that ran passed, 1 one failed), 1 when CUDA is unusable, 3 when the wheel
# bundle would not install.
#
# Without network: a .whl/ directory beside the checkout (../shared/gpu/make_bundle.sh builds it) is installed into
# /tmp/site first when DeepSpeed does not import; the project itself never needs it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/first-contact}
PY=${PYTHON:-python3}
KERNEL_TESTS_S=${KERNEL_TESTS_S:-60}
ACCEPTANCE_S=${ACCEPTANCE_S:-300}
WORK=${WORK:-/tmp/growlength-first-contact}
ACCEPTANCE_ARGS=${ACCEPTANCE_ARGS:-}  # more arguments for gpu_acceptance.py (the CPU test: --dry-run --checks ...)
REQUIRE_CUDA=${REQUIRE_CUDA:-1}       # 0: go on without CUDA (the CPU test of this script)
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2

if [ -d .whl ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_first_contact: the .whl/ bundle did not install"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

step() { echo; echo "=== $* ($(date +%T))"; }
{
  step "environment"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" benchmarks/cuda_env.py --json "$OUT/env.json" || [ "$REQUIRE_CUDA" = 0 ] \
    || { echo "gpu_first_contact: CUDA is not usable; stopping"; exit 1; }

  step "CUDA kernel tests (tests/gpu/test_cuda_kernels.py, at most ${KERNEL_TESTS_S} s)"
  timeout -k 10 "$KERNEL_TESTS_S" "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cuda_kernels.py \
    --junitxml "$OUT/kernel-tests.xml"
  echo "kernel tests: exit $?"

  step "acceptance run (benchmarks/gpu_acceptance.py --timeout-s ${ACCEPTANCE_S})"
  rm -rf "$WORK"
  timeout -k 15 $((ACCEPTANCE_S + 90)) "$PY" benchmarks/gpu_acceptance.py --timeout-s "$ACCEPTANCE_S" \
    --json "$OUT/acceptance.json" --out "$WORK" $ACCEPTANCE_ARGS
  rc=$?
  echo "acceptance: exit $rc"
  # the small files only: checkpoints stay behind
  mkdir -p "$OUT/work"
  (cd "$WORK" 2>/dev/null && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
    -o -name '*.txt' -o -name '*.png' \) -size -5M -print0 | xargs -0 -r cp --parents -t "$OUT/work")
  exit $rc
} 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
