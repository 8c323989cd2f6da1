#!/usr/bin/env bash
# Install ep_train and run the main job: by default a tiny MoE run over 2 CPU processes (gloo).
# Extra arguments go to the entry point, e.g.: bash scripts/run.sh --recipe recipes/tiny_cpu.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
exec python -m ep_train.demo "$@"
