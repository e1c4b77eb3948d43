#!/usr/bin/env bash
# Run the transformers-sensitive tests (generation, the loader, the v2 codec) under another
# transformers release: `scripts/test_transformers_compat.sh 4.57.6` (default: the lowest that
# pyproject.toml allows, read from it). `make test-compat` runs it for that lowest bound; plain
# `make test` covers the highest (setup installs the newest release the bound allows).
#
# The release and the huggingface-hub / tokenizers it requires go into their own folder, put
# first on PYTHONPATH over the project's .venv (torch and everything else stay those of .venv),
# so both services the tests start import it too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version=${1:-$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml | head -n 1)}
[ -n "$version" ] || { echo "no transformers lower bound found in pyproject.toml" >&2; exit 2; }
target=${TRANSFORMERS_COMPAT_DIR:-.compat/transformers-$version}
if [ ! -f "$target/.installed" ]; then
  echo "installing transformers==$version into $target ..." >&2
  rm -rf "$target"
  "$PY" -m pip install --quiet --target "$target" "transformers==$version"
  rm -rf "$target"/numpy "$target"/numpy-*.dist-info "$target"/numpy.libs "$target"/bin  # keep .venv's numpy
  touch "$target/.installed"
fi
export PYTHONPATH="$PWD/$target:$PWD"
"$PY" -c 'import transformers; print("transformers", transformers.__version__, "from", transformers.__file__)' >&2
"$PY" -m pytest -q -p no:cacheprovider tests/test_generation_units.py tests/test_generation_streaming.py \
  tests/test_model_service_loader.py tests/test_v2_codec.py "${@:2}"
