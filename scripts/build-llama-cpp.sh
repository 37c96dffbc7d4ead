#!/usr/bin/env bash
# Builds the CPU peer for `redline-engine bench`: llama.cpp as vendored in the PyPI sdist of
# llama-cpp-python, cached outside the repo keyed by version. About 24 minutes on 2 cores, so
# never run by CI. Prints the bin directory on success.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/redline/llama.cpp-$VERSION"
BIN="$CACHE/build/bin"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-tokenize" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
mkdir -p "$CACHE" && cd "$CACHE"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
  # No build isolation: pip only needs the sdist, not a build of cmake from source.
  python3 -m pip install -q scikit-build-core >&2
  python3 -m pip download --no-deps --no-binary llama-cpp-python --no-build-isolation \
    "llama-cpp-python==$VERSION" -d . >&2
fi
[ -d src ] || { mkdir -p src && tar -xzf "llama_cpp_python-$VERSION.tar.gz" -C src --strip-components=1; }
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build -j"$(nproc)" --target llama-server llama-tokenize llama-bench llama-batched-bench >&2
echo "$BIN"
