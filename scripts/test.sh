#!/usr/bin/env bash
# Set up a fresh CPU machine and run the whole test suite (Triton kernels under the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: the CPU build (a looser pin would pull a CUDA build of several GB)
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[cpu,test]"
export TRITON_INTERPRET=1
exec $PY -m pytest -q -rs "$@"
