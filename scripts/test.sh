#!/usr/bin/env bash
# One command for the tests on a fresh machine: tools, the llama-cpp-python wheel, the default models
# (cached in ~/.cache/localai-aio), then every test on Python 3.11 and ruff. Extra arguments go to tox instead,
# e.g. `-e py312,py313,onnx-gpu` (the rest of the matrix, which .ci/run also runs).
source "$(dirname "$0")/common.sh"
cd "$(dirname "$0")/.."

PY311=$(find_python 3.11) || { echo "Python 3.11 is required" >&2; exit 1; }
# tox looks for python3.12 and python3.13 on PATH; point it at real interpreters (pyenv's shims are not).
PYTHONS="$CACHE_DIR/pythons"
mkdir -p "$PYTHONS"
for v in 3.11 3.12 3.13; do
    if real=$(find_python "$v"); then
        ln -sf "$real" "$PYTHONS/python$v"
    fi
done
export PATH="$PYTHONS:$PATH"

TOOLS="$CACHE_DIR/tools"
[ -x "$TOOLS/bin/tox" ] || { "$PY311" -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q "tox>=4.20"; }
build_llama_wheel "$PY311"

# The default models, for the tests marked `model`.
export LOCALAI_TEST_MODELS_PATH="${LOCALAI_TEST_MODELS_PATH:-$CACHE_DIR/models}"
"$TOOLS/bin/tox" -e py311 --notest -q
.tox/py311/bin/python -m localai_aio models install --defaults --models-path "$LOCALAI_TEST_MODELS_PATH"

if [ "$#" -eq 0 ]; then
    # the step above has just installed this tree into py311: no second build of the package
    set -- -e py311,lint --skip-pkg-install
fi
exec "$TOOLS/bin/tox" "$@"
