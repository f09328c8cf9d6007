#!/usr/bin/env bash
# Quickstart: install, train the digits demo for a few epochs with StiffnessCallback, say where the logs are.
source "$(dirname "$0")/_env.sh" examples
python examples/digits.py fit --config examples/configs/fc.yaml --trainer.default_root_dir runs/demo "$@"
echo
echo "TensorBoard logs are in $(pwd)/runs/demo/lightning_logs. View them with:"
echo "    .venv/bin/tensorboard --logdir $(pwd)/runs/demo/lightning_logs"
