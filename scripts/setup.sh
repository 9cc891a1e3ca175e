#!/usr/bin/env bash
# Creates .venv (if missing) and installs apmon with everything its tests need (the trainer
# integrations' extras included).
# torch/torchvision come first as the index's matched pair ("===" pins the exact build), and the
# constraints file keeps every later install from moving them.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -c constraints.txt "torch===2.13.0" "torchvision===0.28.0"
pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[service,dev,lightning,hf]"
