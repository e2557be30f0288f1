"""`--config FILE.yaml`: flag names to values, read and turned into command-line flags that the command line
itself then overrides (it comes after them). A key must be exactly a flag's name: no prefix matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from itertrain.args import TRL_NAMES
from itertrain.errors import UsageError


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping of a --config file; UsageError (exit 2) when it is missing, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values")
    return data


def check_one_name(given: set[str]) -> None:
    """UsageError (exit 2) when the command line gives one setting under both its names (itertrain's older one
    and TRL's), which would otherwise silently keep the last; the same flag twice is argparse's last-wins."""
    names = {g.replace("-", "_") for g in given}
    both = [(old, new) for old, new in TRL_NAMES.items() if old in names and new in names]
    if both:
        raise UsageError(f"{', '.join(f'--{o} and --{n}' for o, n in both)} name the same setting; keep "
                         f"{', '.join(f'--{n}' for _, n in both)} (TRL's name)")


def yaml_to_argv(data: dict[str, Any], known: set[str], path: str) -> list[str]:
    """YAML keys as flags; a key that is not exactly a flag's name is refused (no prefix matching)."""
    unknown = sorted(str(k) for k in data if str(k) not in known)
    both = [(old, new) for old, new in TRL_NAMES.items() if old in data and new in data]
    if both:
        raise UsageError(f"--config {path}: {', '.join(f'{o} and {n}' for o, n in both)} name the same setting; "
                         f"keep {', '.join(n for _, n in both)} (TRL's name)")
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, n=1)) else k for k in unknown]
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(hints)}")
    argv: list[str] = []
    for key, value in data.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
