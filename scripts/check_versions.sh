#!/usr/bin/env bash
# The version-range checks (CI runs both after the main suite): itertrain at either end of the ranges
# pyproject.toml declares, each in its own git-ignored venv with torch==2.13.0 (the CPU build, as the bootstrap):
#   lowest  .venv-lowest: exactly constraints-lowest.txt (the floors), extras test and lora
#   newest  .venv-newest: no constraints file, so pip picks the newest versions in range, as it does for
#           a new user; extras test, dpo and lora
# Then, in that venv: (a) the fast tier and (b) scripts/check_relaunch.py: 2-iteration, 2-rank runs (full
# fine-tuning, then LoRA) killed inside checkpoint saves and relaunched, byte-identical to uninterrupted ones.
#   scripts/check_versions.sh lowest|newest               set up (skipped while its inputs are unchanged), check
#   scripts/check_versions.sh lowest|newest --setup-only  set up only (.ci/run does it during the main suite)
# scripts/check_lowest.sh and scripts/check_newest.sh are this script with its first argument filled in.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-}"
mode="${2:-}"
case "$which" in
  lowest) label="lower-bound check" ;;
  newest) label="newest-versions check" ;;
  *) echo "usage: scripts/check_versions.sh lowest|newest [--setup-only]" >&2; exit 2 ;;
esac
case "$mode" in
  ""|--setup-only) ;;
  *) echo "usage: scripts/check_versions.sh $which [--setup-only]   (unknown argument: $mode)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3.11}"
VENV=".venv-$which"
start=$(date +%s)
# --no-compile: no .pyc for all of torch up front (halves the install); what runs compiles on import.
pip_install() { "$VENV/bin/python" -m pip install -qq --disable-pip-version-check --no-compile "$@"; }

setup_lowest() {
  pip_install -c constraints-lowest.txt torch -e '.[test,lora]'
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
}

setup_newest() {
  # --upgrade-strategy eager: an existing venv's dependencies move to the newest versions in range too.
  # torch is named so that it stays the CPU build: an unpinned torch pulls a multi-GB CUDA build.
  pip_install --upgrade --upgrade-strategy eager torch==2.13.0 -e '.[test,dpo,lora]'
}

# The setup is skipped while its inputs are unchanged. "Newest" changes on PyPI, not here, so the newest
# check's inputs include the date: it resolves again once a day (CI's clean clone always does).
case "$which" in
  lowest) stamp=$(cat constraints-lowest.txt pyproject.toml | sha256sum | cut -d' ' -f1) ;;
  newest) stamp=$( (cat pyproject.toml; date -u +%F) | sha256sum | cut -d' ' -f1) ;;
esac
if [ "$(cat "$VENV/.itertrain-stamp" 2>/dev/null)" != "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "setup_$which"
  "$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check >&2; exit 1; }
  # Compile what the checks import, here (in CI: in the background): with PYTHONDONTWRITEBYTECODE set and no
  # .pyc, each of the check's ~30 processes compiled torch, transformers and peft again (14 s of CPU instead of 5).
  env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c \
    "import itertrain.loop, itertrain.cli, torch.distributed.run, matplotlib.pyplot, tensorboard, pytest, xdist"
  [ "$which" = lowest ] || env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c "from trl import DPOConfig, DPOTrainer"
  echo "$stamp" > "$VENV/.itertrain-stamp"
fi
# What pip chose, so that a CI log says which versions passed (or failed).
"$VENV/bin/python" - "$label" <<'EOF'
import importlib.metadata as md, sys
have = []
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub"):
    try:
        have.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        have.append(f"{name} (not installed)")
print(f"{sys.argv[1]}: Python {sys.version.split()[0]}, " + ", ".join(have))
EOF
echo "$label: $VENV ready ($(( $(date +%s) - start ))s)"
[ "$mode" = "--setup-only" ] && exit 0
t=$(date +%s)
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
echo "$label: fast tier passed ($(( $(date +%s) - t ))s)"
OMP_NUM_THREADS=1 "$VENV/bin/python" scripts/check_relaunch.py --label "$label"
echo "$label: done in $(( $(date +%s) - start ))s"
