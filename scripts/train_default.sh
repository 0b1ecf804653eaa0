#!/usr/bin/env bash
# The main job: set up .venv, train configs/default.yaml on ../shared/data, print the dev table.
#   bash scripts/train_default.sh [KEY=VALUE overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mtbert train --config configs/default.yaml "$@"
