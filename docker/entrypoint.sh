#!/bin/sh
# Container entry: moba-serve with the model and port from the environment; arguments are extra
# `vllm serve` flags. An empty MOBA_MODEL serves the embedded model; MOBA_ATTENTION_CONFIG is read
# by moba-serve itself.
set -e
if [ -n "${MOBA_MODEL}" ]; then
  set -- --model "${MOBA_MODEL}" "$@"
fi
exec moba-serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
