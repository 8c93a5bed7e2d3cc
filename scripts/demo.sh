#!/usr/bin/env bash
# Sets up .venv if needed and runs the demo: a small CPU training loop that checkpoints
# asynchronously and prints how long the loop was blocked versus plain torch.save.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m aiockpt demo "$@"
