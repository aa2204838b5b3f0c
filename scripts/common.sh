# Shared by scripts/serve.sh and scripts/test.sh: a Python 3.11 and the llama-cpp-python wheel.
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36
CACHE_DIR="${LOCALAI_CACHE_DIR:-$HOME/.cache/localai-aio}"
export LOCALAI_WHEELHOUSE="${LOCALAI_WHEELHOUSE:-$CACHE_DIR/wheelhouse}"

find_python() {
    # $1: version, e.g. 3.11. pyenv's interpreters count too, without changing its global setting.
    local v="$1" candidate
    for candidate in "python$v" "$HOME/.pyenv/versions/$v"*/bin/python"$v"; do
        if command -v "$candidate" >/dev/null 2>&1 \
                && "$candidate" -c 'import sys; print(sys.executable)' 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

build_llama_wheel() {
    # llama-cpp-python compiles llama.cpp (about 16 minutes on 2 cores the first time; then cached here).
    local py="$1"
    mkdir -p "$LOCALAI_WHEELHOUSE"
    if ! ls "$LOCALAI_WHEELHOUSE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python $LLAMA_CPP_VERSION (first time only; several minutes)..." >&2
        "$py" -m pip wheel --no-deps -w "$LOCALAI_WHEELHOUSE" "llama-cpp-python==$LLAMA_CPP_VERSION"
    fi
}
