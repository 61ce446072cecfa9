#!/usr/bin/env bash
# Installs the services that sweeps and tracking hand runs to, for the engine tests (tests/engines,
# `pytest -m engines`) and for users who want them here. Idempotent: a step already done is skipped in
# a second; rerun it freely.
#
#   PostgreSQL (Debian's package)  the server binaries only: the tests start their own throwaway cluster
#                                  (initdb in a temporary directory, a non-root user, 127.0.0.1, a free
#                                  port). Needs root (apt-get); skipped when `initdb` is already there.
#   the active Python              psycopg2-binary: the driver that `postgresql+psycopg2://` names.
#   .engines/mlflow/               the full `mlflow` server in its own venv: its server extras (Flask,
#                                  alembic, pandas pins ...) are not for the project env, which has
#                                  mlflow-skinny as the client. FINETUNE_MLFLOW points at its `mlflow`.
#   .engines/deepspeed/            deepspeed (pure Python; its CPU accelerator builds its one shared-memory op
#                                  with g++ at first use) and its small dependencies, installed with
#                                  --target so that the project env stays without it: put the folder on
#                                  PYTHONPATH to launch configs/accelerate/deepspeed-*.yaml.
#
# Usage: bash scripts/setup_services.sh [postgres|mlflow|deepspeed|all]   (default all), with the project's env active.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ENGINES=$ROOT/.engines
MLFLOW_VERSION=3.17.2       # the server at the same version as the client (mlflow-skinny) in the project env
PSYCOPG2_VERSION=2.9.13
DEEPSPEED_VERSION=0.19.8
WHAT=${1:-all}
PY=${PYTHON:-python}
mkdir -p "$ENGINES"

step() {  # step NAME COMMAND...: run and time one step
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "setup_services: $name took $((SECONDS - start)) s"
}

pg_bindir() {  # the newest installed PostgreSQL's bin directory, or nothing
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

postgres_server() {
  if [ -n "$(pg_bindir)" ]; then
    echo "setup_services: PostgreSQL already installed in $(pg_bindir)"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "setup_services: PostgreSQL is not installed and installing it needs root (apt-get install postgresql)" >&2
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
    echo "setup_services: psycopg2 already importable by $PY"
    return
  fi
  "$PY" -m pip install -q "psycopg2-binary==$PSYCOPG2_VERSION"
}

mlflow_server() {
  local venv=$ENGINES/mlflow
  if [ -x "$venv/bin/mlflow" ] && [ -f "$venv/.finetune-mlflow-$MLFLOW_VERSION" ]; then
    echo "setup_services: mlflow $MLFLOW_VERSION server already in $venv"
    return
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "mlflow==$MLFLOW_VERSION"
  "$venv/bin/mlflow" --version
  touch "$venv/.finetune-mlflow-$MLFLOW_VERSION"
}

deepspeed_target() {
  local target=$ENGINES/deepspeed
  if [ -f "$target/.finetune-deepspeed-$DEEPSPEED_VERSION" ]; then
    echo "setup_services: deepspeed $DEEPSPEED_VERSION already in $target"
    return
  fi
  rm -rf "$target"
  # --no-deps: torch, numpy, pydantic, psutil, packaging and tqdm come from the project env
  "$PY" -m pip install -q --target "$target" --no-deps "deepspeed==$DEEPSPEED_VERSION" \
    hjson==3.1.0 py-cpuinfo==9.0.0 einops msgpack ninja
  PYTHONPATH=$target "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
  touch "$target/.finetune-deepspeed-$DEEPSPEED_VERSION"
}

total=$SECONDS
case $WHAT in
  postgres|all)
    step "PostgreSQL server" postgres_server
    step "psycopg2-binary" postgres_driver
    ;;
esac
case $WHAT in
  mlflow|all) step "mlflow server venv" mlflow_server ;;
esac
case $WHAT in
  deepspeed|all) step "deepspeed (--target)" deepspeed_target ;;
esac
case $WHAT in
  postgres|mlflow|deepspeed|all) ;;
  *) echo "usage: bash scripts/setup_services.sh [postgres|mlflow|deepspeed|all]" >&2; exit 2 ;;
esac
echo "setup_services: done in $((SECONDS - total)) s"
[ -n "$(pg_bindir)" ] && echo "  FINETUNE_PG_BINDIR=$(pg_bindir)"
[ -x "$ENGINES/mlflow/bin/mlflow" ] && echo "  FINETUNE_MLFLOW=$ENGINES/mlflow/bin/mlflow"
[ -d "$ENGINES/deepspeed/deepspeed" ] && echo "  FINETUNE_DEEPSPEED_PATH=$ENGINES/deepspeed"
exit 0
