#!/usr/bin/env bash
# Remakes the sample models in models/ with the pinned packages, in models/.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x models/.venv/bin/python ]; then
  python3 -m venv models/.venv
fi
models/.venv/bin/pip install --quiet --disable-pip-version-check -r models/requirements.txt
models/.venv/bin/python models/make_models.py
