#!/usr/bin/env bash
# On a GPU machine without network: install the carried wheels (.whl/), run the test suite on the
# GPU, then the benchmark given in BENCH_ARGS (if any). Logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moba-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  python3 -m pytest -q -rs ${TEST_ARGS:-tests/ops tests/test_attention.py} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ -n "${BENCH_ARGS:-}" ]; then
  python3 benchmarks/bench_attention.py $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
fi
