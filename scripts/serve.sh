#!/usr/bin/env bash
# Set up a fresh CPU machine and start the OpenAI-compatible server with MoBA on the embedded
# model (or the model and flags you pass: every `vllm serve` flag works).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
exec moba-serve "$@"
