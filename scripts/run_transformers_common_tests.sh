#!/usr/bin/env bash
# Run transformers' own common model tests (ModelTesterMixin, ConfigTester) on CALMForCausalLM with the installed
# transformers (4.57.x or 5.x), taking the test files from that version's source release: pip installs leave them out.
#
#   bash scripts/run_transformers_common_tests.sh [--sdist transformers-X.Y.Z.tar.gz] [pytest args...]
#
# PYTHON picks the interpreter whose transformers is tested (default: python). The sdist is --sdist, or
# TRANSFORMERS_SDIST, or else downloaded with `pip download` into scratch/transformers-sdist/. Its tests/ folder is
# extracted to scratch/transformers-tests/ (git-ignored, kept for the next run). TRANSFORMERS_TESTS=/folder/holding/tests
# (e.g. a git checkout of the same version) skips both. Extra arguments go to pytest (e.g. -k attention -x).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
SCRATCH=scratch

SDIST=${TRANSFORMERS_SDIST:-}
if [ "${1:-}" = "--sdist" ]; then
  SDIST=$2
  shift 2
fi

VERSION=$("$PY" -c "import transformers; print(transformers.__version__)")
echo "transformers $VERSION ($("$PY" -c 'import sys; print(sys.executable)'))"

if [ -z "${TRANSFORMERS_TESTS:-}" ]; then
  if [ -z "$SDIST" ]; then
    SDIST=$SCRATCH/transformers-sdist/transformers-$VERSION.tar.gz
    if [ ! -f "$SDIST" ]; then
      # --no-binary: the sdist, the only release file that carries tests/ (a dev build has none to download:
      # pass --sdist or TRANSFORMERS_TESTS then).
      "$PY" -m pip download -q --no-deps --no-binary :all: "transformers==$VERSION" -d "$SCRATCH/transformers-sdist"
    fi
  fi
  # The release's top folder is transformers-X.Y.Z; warn when it is not the installed version.
  TOP=$(tar -tzf "$SDIST" | awk -F/ 'NR == 1 {print $1}')  # awk reads it all: no SIGPIPE under pipefail
  if [ "$TOP" != "transformers-$VERSION" ]; then
    echo "warning: $SDIST holds $TOP, but transformers $VERSION is installed: its tests may not match" >&2
  fi
  TRANSFORMERS_TESTS=$SCRATCH/transformers-tests/$TOP
  if [ ! -f "$TRANSFORMERS_TESTS/tests/test_modeling_common.py" ]; then
    mkdir -p "$SCRATCH/transformers-tests"
    tar -xzf "$SDIST" -C "$SCRATCH/transformers-tests" "$TOP/tests"
  fi
fi
export TRANSFORMERS_TESTS=$(cd "$TRANSFORMERS_TESTS" && pwd)
echo "transformers tests from $TRANSFORMERS_TESTS/tests"

# transformers' test files import `parameterized` (part of transformers' own test requirements).
if ! "$PY" -c "import parameterized" 2>/dev/null; then
  echo "installing parameterized (imported by transformers' test files)"
  "$PY" -m pip install -q parameterized
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
status=0
"$PY" -m pytest scripts/transformers_common_tests.py -q -p no:cacheprovider -rfEs --tb=short "$@" | tee "$LOG" ||
  status=$?
# pytest's closing line (passed / failed / skipped, and subtests), named by the version it ran on.
echo "transformers $VERSION: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$LOG" | tail -1 | tr -d '=' | xargs)"
exit "$status"
