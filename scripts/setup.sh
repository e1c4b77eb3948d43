#!/usr/bin/env bash
# Create .venv (once) and install splitserve with everything the services, tests and demo need.
# torch 2.13.0 here is the CPU build; for a GPU host see README "GPU hosts".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.splitserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[preproc,model,dev]"
  touch "$stamp"
fi
