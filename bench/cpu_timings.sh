#!/usr/bin/env bash
# Wall-clock times behind the README's quick-start claims, on this machine: the demo and the test suite.
#   bash bench/cpu_timings.sh
set -uo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__)')"
start=$(date +%s.%N)
python examples/finetune.py > /tmp/qwenloop-demo.log 2>&1
echo "demo (python examples/finetune.py): rc=$? $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s; $(grep '^loss:' /tmp/qwenloop-demo.log)"
start=$(date +%s.%N)
python -m pytest -q tests -p no:warnings > /tmp/qwenloop-tests.log 2>&1
echo "tests (python -m pytest -q tests): rc=$? $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s; $(grep -aoE "[0-9]+ (passed|failed)[^=]*" /tmp/qwenloop-tests.log | tail -n 1)"
