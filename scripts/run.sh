#!/usr/bin/env bash
# Install ep_train with the training extras and run the main job: by default the tiny MoE recipe
# (Megatron-Core GPT with ep_train's "deepep" dispatcher) on 2 CPU processes over gloo, with wandb
# logging offline unless an API key is configured.  Arguments go to the entry point, e.g.
#   bash scripts/run.sh --recipe recipes/mixtral_like_1node.yaml --set train.steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[train]"
exec python -m ep_train.train "$@"
