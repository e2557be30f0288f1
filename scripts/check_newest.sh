#!/usr/bin/env bash
# The newest-versions check: the fast tier and a 2-rank kill-and-relaunch in .venv-newest, at the newest
# versions in the ranges pyproject.toml declares (what pip gives a new user today; no constraints file).
# What it does: scripts/check_versions.sh.
#   scripts/check_newest.sh [--setup-only]
exec "$(dirname "$0")/check_versions.sh" newest "$@"
