#!/usr/bin/env bash
# Create .venv (once) and install splitserve with everything the services, tests and demo need.
# torch 2.13.0 here is the CPU build; for a GPU host see README "GPU hosts".
# Progress goes to stderr: each step as it starts, then pip's own lines (a first install takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$SECONDS
step() { echo "setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.splitserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "upgrading pip"
  .venv/bin/python -m pip install --quiet --upgrade pip
  step "installing torch 2.13.0 (CPU) and splitserve[preproc,model,dev]: the first time takes a few minutes"
  # pip's lines about what it fetches and installs; pipefail keeps pip's own exit status.
  .venv/bin/python -m pip install "torch==2.13.0" -e ".[preproc,model,dev]" 2>&1 \
    | { grep --line-buffered -E '^(Collecting|Downloading|Installing|Successfully|ERROR|WARNING)' >&2 || true; }
  touch "$stamp"
  step "done in $((SECONDS - started)) s"
else
  step ".venv is up to date with pyproject.toml"
fi
