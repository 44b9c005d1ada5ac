#!/usr/bin/env bash
# Creates .venv with everything glmkit needs. Used by both README commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision must be a matched pair: icetk imports torchvision at import time.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# SwissArmyTransformer's metadata pulls DeepSpeed and friends; its model code needs only what
# pyproject.toml lists, so it is installed without dependencies (see [tool.glmkit] no-deps).
.venv/bin/python -m pip install -q --no-deps "SwissArmyTransformer==0.4.12"
