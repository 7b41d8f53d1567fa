#!/usr/bin/env bash
# Builds llama.cpp's own command-line tools `llama-imatrix` and `llama-quantize` from the llama.cpp source that the
# installed llama-cpp-python was built from (its sdist from the package registry vendors llama.cpp, tools included),
# so that benchmarks/bench_gguf.py compares hf_quant with llama.cpp's importance matrix computed by llama.cpp itself.
# The binding ships neither tool. Cached per binding version; prints the directory holding the two binaries.
#
#   bash benchmarks/build_llama_tools.sh            # ~5-10 minutes on 2 cores the first time
#   HF_QUANT_LLAMA_TOOLS=/some/cache bash benchmarks/build_llama_tools.sh
set -euo pipefail
PY=${PYTHON:-python}
VERSION=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)") || {
  echo "llama-cpp-python is not installed: install it first (see .ci/run)" >&2; exit 1; }
DEST="${HF_QUANT_LLAMA_TOOLS:-$HOME/.cache/hf_quant-llama-tools}/$VERSION"
if [ -x "$DEST/llama-imatrix" ] && [ -x "$DEST/llama-quantize" ]; then
  echo "$DEST"; exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
# GGML_NATIVE=OFF as the binding's wheel is built in .ci/run; no network features, no tests or server
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$WORK/build" --target llama-imatrix llama-quantize -j "${JOBS:-$(nproc)}" >&2
mkdir -p "$(dirname "$DEST")"
STAGE=$(mktemp -d "$(dirname "$DEST")/.build.XXXXXX")
cp "$WORK/build/bin/llama-imatrix" "$WORK/build/bin/llama-quantize" "$STAGE/"
rm -rf "$DEST" && mv "$STAGE" "$DEST"  # whole or not at all
echo "$DEST"
