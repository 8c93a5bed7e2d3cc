#!/usr/bin/env bash
# Creates .venv (if missing) with aiockpt installed in editable mode with the extras the
# test command needs (test: pytest and friends; docs: the site build; dev: ruff and mypy);
# reinstalls when pyproject.toml changed since the last install.
# Torch comes first and explicitly: a bare "torch" requirement could pull a CUDA build of
# several GB. Set AIOCKPT_TORCH_SPEC to choose another torch (any release >= 2.6 works).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "${AIOCKPT_TORCH_SPEC:-torch==2.13.0}"
fi
stamp=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.aiockpt-installed 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/pip install -q -e ".[test,docs,dev]"
  echo "$stamp" > .venv/.aiockpt-installed
fi
