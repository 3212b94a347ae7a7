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
# On an AMX CPU, -march=native compiles llama.cpp's AMX kernels, and this version runs them without first asking Linux
# for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM): the tools die with SIGILL (seen on a Xeon with AMX, in
# llama-bench's Q4_1 matmul). Build them without AMX there; its AVX-512/VNNI kernels remain.
CPU_FLAGS=""
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then CPU_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
STAMP="$W/llamacpp-build/effinfer-build-flags"
missing=0
for t in "${TARGETS[@]}"; do [ -x "$W/llamacpp-build/bin/$t" ] || missing=1; done
[ "$(cat "$STAMP" 2>/dev/null)" = "native $CPU_FLAGS" ] || missing=1     # built for another CPU setting: again
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
[ -z "$CPU_FLAGS" ] || echo "an AMX CPU: building without llama.cpp's AMX kernels ($CPU_FLAGS)"
cmake -S "$SRC" -B "$W/llamacpp-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$CPU_FLAGS" -DCMAKE_CXX_FLAGS="$CPU_FLAGS" \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$W/cmake-configure.log"
cmake --build "$W/llamacpp-build" --target "${TARGETS[@]}"
echo "native $CPU_FLAGS" > "$STAMP"
echo "llama.cpp tools built in $W/llamacpp-build/bin"
