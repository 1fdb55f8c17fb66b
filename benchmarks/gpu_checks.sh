#!/usr/bin/env bash
# The GPU checks of the speed issue as one command, for a machine with a CUDA GPU and no network:
#   1. the test suite's CUDA cases (`pytest -k cuda`: generation equivalences, the argmax, the compiled static cache);
#   2. the side-by-side benchmark on CUDA in bf16, CALM-M shapes, with the compiled columns as CUDA graphs.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]     # OUT_DIR: default $OUT, else benchmarks/gpu
#
# Needs torch with CUDA, transformers, pytest and hypothesis installed (nothing is installed: the package is imported
# from this checkout). Each part has its own time limit, so that one that hangs leaves the others their time.
# Try it on a CPU first: DEVICE=cpu BENCH_ARGS="--shape tiny --repeats 1 --max-new-tokens 8" bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT_DIR=${1:-${OUT:-}}
[ -n "$OUT_DIR" ] && OUT_DIR=$(realpath -m "$OUT_DIR")  # relative to where it was called from
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/gpu}
DEVICE=${DEVICE:-cuda}
BENCH_ARGS=${BENCH_ARGS:---repeats 3}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# `import calm_transformers` from this checkout: the repository root is the package.
PACKAGE_PATH=$(mktemp -d)
ln -s "$PWD" "$PACKAGE_PATH/calm_transformers"
export PYTHONPATH="$PACKAGE_PATH${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "
import calm_transformers, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU'
print('torch', torch.__version__, '| transformers', transformers.__version__, '|', gpu)
print('calm_transformers from', calm_transformers.__file__)
" 2>&1 | tee "$OUT_DIR/environment.txt"

status=0
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -rs -p no:cacheprovider tests -k cuda 2>&1 \
  | tee "$OUT_DIR/tests_cuda.log" || status=1

# shellcheck disable=SC2086  # BENCH_ARGS holds several arguments
timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/benchmark_generation.py --device "$DEVICE" --dtype bfloat16 \
  --compile reduce-overhead $BENCH_ARGS --output "$OUT_DIR/results_${DEVICE}_bf16.json" 2>&1 \
  | tee "$OUT_DIR/benchmark.log" || status=1

rm -rf "$PACKAGE_PATH"
exit $status
