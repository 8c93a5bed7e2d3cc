#!/usr/bin/env bash
# Sets up .venv if needed and runs the test suite (CUDA tests skip without a GPU).
# Test files run in parallel, one file per process (a document's blocks share state);
# AIOCKPT_TEST_PROCESSES sets how many (4 by default: the tests mostly wait on worker
# processes). The 15 slowest tests are listed at the end. A quick inner loop:
#   bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -n "${AIOCKPT_TEST_PROCESSES:-4}" --dist loadfile \
    --durations=15 "$@"
