#!/usr/bin/env bash
# The lower-bound check (CI runs it after the main suite): itertrain at the lowest versions pyproject.toml
# declares. Sets up .venv-lowest (git-ignored) with constraints-lowest.txt (torch==2.13.0, the CPU build,
# as the bootstrap), then runs (a) the fast tier and (b) scripts/check_lowest.py: a 2-iteration, 2-rank
# run killed inside checkpoint saves and relaunched, byte-identical to an uninterrupted one.
#   scripts/check_lowest.sh               set up (skipped while constraints and pyproject are unchanged), check
#   scripts/check_lowest.sh --setup-only  set up only (.ci/run does it in the background during the main suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
VENV=.venv-lowest
start=$(date +%s)
stamp=$(cat constraints-lowest.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.itertrain-stamp" 2>/dev/null)" != "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # --no-compile: no .pyc for all of torch up front (halves the install); what runs compiles on import.
  "$VENV/bin/python" -m pip install -qq --disable-pip-version-check --no-compile \
    -c constraints-lowest.txt torch -e '.[test,lora]'
  # A declared dependency the resolver moved off its floor would make this check test something else.
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, sys
bad = []
for line in open("constraints-lowest.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        have = md.version(name)
        if have.split("+")[0] != want:
            bad.append(f"{name} {have} (constraints-lowest.txt: {want})")
if bad:
    sys.exit("lower-bound check: installed versions differ from the floors: " + "; ".join(bad))
EOF
  echo "$stamp" > "$VENV/.itertrain-stamp"
fi
echo "lower-bound check: .venv-lowest ready ($(( $(date +%s) - start ))s)"
[ "${1:-}" = "--setup-only" ] && exit 0
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
OMP_NUM_THREADS=1 "$VENV/bin/python" scripts/check_lowest.py
echo "lower-bound check: done in $(( $(date +%s) - start ))s"
