#!/usr/bin/env bash
# Install ep_train with its test extras and run the test suite (GPU tests skip themselves without GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,train]"
python -m pytest -q "$@"
