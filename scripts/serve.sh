#!/usr/bin/env bash
# One command to serve on a fresh machine: a virtualenv in .venv, the engines, the default models
# (installed into ./models on first start), then the server. Extra arguments go to `serve`.
source "$(dirname "$0")/common.sh"
cd "$(dirname "$0")/.."

PY311=$(find_python 3.11) || { echo "Python 3.11 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY311" -m venv .venv
build_llama_wheel "$PY311"
.venv/bin/pip install -q --find-links "$LOCALAI_WHEELHOUSE" -e ".[llama,ctransformers,onnx,tts,stt,export]"
.venv/bin/python -m localai_aio models install --defaults
exec .venv/bin/python -m localai_aio serve "$@"
