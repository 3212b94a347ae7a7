#!/usr/bin/env bash
# Build llama.cpp's native tools, the peer's own instruments (llama-bench, llama-batched-bench, llama-quantize,
# llama-server, llama-perplexity), from the llama.cpp source vendored in the llama-cpp-python sdist: only the
# sdist is downloaded, from the package registry; nothing of it is installed. ~7 minutes on 2 cores, once.
# Usage: bash benchmarks/build_llamacpp.sh [TARGET ...]   (default: all five; `make peers` runs it)
# Output: $LLAMACPP_WORKDIR/llamacpp-build/bin (default ~/.cache/llamacpp-tools), where effinfer looks for them.
set -euo pipefail
W=${LLAMACPP_WORKDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llamacpp-tools}
V=${LLAMACPP_PYTHON_VERSION:-0.3.36}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(llama-bench llama-batched-bench llama-quantize llama-server llama-perplexity)
missing=0
for t in "${TARGETS[@]}"; do [ -x "$W/llamacpp-build/bin/$t" ] || missing=1; done
if [ "$missing" = 0 ]; then echo "llama.cpp tools present in $W/llamacpp-build/bin"; exit 0; fi
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$HERE/.venv/bin/python" ] && PY="$HERE/.venv/bin/python"
export PATH="$(dirname "$PY"):$PATH"           # the venv's ninja (and cmake, below, if the system has none)
command -v cmake >/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "cmake==3.31.6"
echo "building llama.cpp's ${TARGETS[*]} from llama-cpp-python $V's source into $W (~7 minutes on 2 cores)"
mkdir -p "$W/sdist"; cd "$W"
[ -f "sdist/llama_cpp_python-$V.tar.gz" ] || "$PY" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$V" -d sdist
[ -d "llama_cpp_python-$V" ] || tar xzf "sdist/llama_cpp_python-$V.tar.gz"
SRC="$W/llama_cpp_python-$V/vendor/llama.cpp"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# Web UI off (would need npm or a download); OpenSSL off (loopback-only HTTP).
cmake -S "$SRC" -B "$W/llamacpp-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$W/cmake-configure.log"
cmake --build "$W/llamacpp-build" --target "${TARGETS[@]}"
echo "llama.cpp tools built in $W/llamacpp-build/bin"
