#!/usr/bin/env bash
# Set up .venv (Python 3.11) with itertrain, its pinned dependencies and the extras test, dpo (TRL), lora (PEFT), trackers (W&B, MLflow)
# and docs (MkDocs, for CI's `mkdocs build --strict`). Idempotent.
# torch is pinned to 2.13.0, the CPU build: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,dpo,lora,docs,trackers]'
