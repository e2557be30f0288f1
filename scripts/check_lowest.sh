#!/usr/bin/env bash
# The lower-bound check: the fast tier and a 2-rank kill-and-relaunch in .venv-lowest, at exactly the floors
# pyproject.toml declares (constraints-lowest.txt). What it does: scripts/check_versions.sh.
#   scripts/check_lowest.sh [--setup-only]
exec "$(dirname "$0")/check_versions.sh" lowest "$@"
