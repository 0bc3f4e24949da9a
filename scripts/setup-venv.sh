#!/usr/bin/env bash
# Create .venv with every extra (selfxit[all]) at the tested versions, selfxit in editable mode (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
    # torch/torchvision first and pinned: other versions download GBs or break torchvision's operators.
    .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e '.[all,test,test-models]'
echo "selfxit installed in $(pwd)/.venv"
