"""Checks of parsed flag values that need nothing but the values: a number that must be finite, a flag that
means nothing without another. UsageError (exit 2) naming the flag."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from itertrain.args import flag
from itertrain.errors import UsageError

# TRL's / HF's float flags of the strategies that a NaN or infinity would turn into a NaN loss or reward
# (other trainer flags keep HF's own meaning: some take inf as "no cap").
TRAINING_FINITE = ("beta", "reward_weights", "learning_rate", "temperature", "top_p")


def _not_finite(value: Any) -> Any:
    """The first non-finite float of a value (a float, or a list of them), else None."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return next((v for v in values if isinstance(v, float) and not math.isfinite(v)), None)


def check_finite(groups: list[Any], training: Any) -> None:
    """Every float of itertrain's own flag groups, and TRAINING_FINITE of the trainer's, is finite."""
    named = [(g, f.name) for g in groups for f in fields(g)]
    named += [(training, name) for name in TRAINING_FINITE if hasattr(training, name)]
    for group, name in named:
        bad = _not_finite(getattr(group, name))
        if bad is not None:
            raise UsageError(f"{flag(name)} {getattr(group, name)}: must be a finite number, not {bad}")


def check_dataset_flags(loop: Any) -> None:
    """--dataset_config and --dataset_split choose within --dataset_name: refused without it."""
    if not loop.dataset_name and loop.dataset_config:
        raise UsageError(f"--dataset_config {loop.dataset_config} without --dataset_name: it names a configuration "
                         "of a dataset; pass --dataset_name too, or drop it")
