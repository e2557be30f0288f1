"""Reward functions for the strategies that score their samples (`--reward_fn module:function`).

Two forms are accepted, told apart by the signature (or by `fn.batched = True`):
- per sample: `fn(prompt, completion, answer) -> float`;
- batched, TRL's form: `fn(prompts, completions, **columns) -> list[float]`, where `columns` are the
  prompt rows' other fields as lists (e.g. `answer=[...]`), one entry per completion.
The function is imported with the current directory on the import path and tried on one example at
launch, before anything is written (`check_reward_fn`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from itertrain.errors import RewardFunctionError, UsageError


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """The built-in reward: 1.0 when the completion is the reference answer (whitespace-trimmed)."""
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def _is_batched(fn: Callable[..., Any]) -> bool:
    marker = getattr(fn, "batched", None)
    if marker is not None:
        return bool(marker)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "prompts" in params and "completions" in params


@dataclass
class RewardFunction:
    """A reward function of either form, called on batches: `score(rows, completions) -> rewards`."""

    fn: Callable[..., Any]
    spec: str
    batched: bool

    def score(self, rows: list[dict[str, Any]], completions: list[list[str]]) -> list[list[float]]:
        """rewards[i][s] for completion s of prompt row i."""
        flat_rows = [(i, row) for i, row in enumerate(rows) for _ in completions[i]]
        flat = [c for outs in completions for c in outs]
        if self.batched:
            columns = {k: [row.get(k) for _, row in flat_rows] for k in {k for _, r in flat_rows for k in r} - {"prompt"}}
            try:
                values = list(self.fn(prompts=[r["prompt"] for _, r in flat_rows], completions=flat, **columns))
            except Exception as e:  # noqa: BLE001 - user code: report it readably, whatever it raised
                raise RewardFunctionError(f"reward function {self.spec} raised {type(e).__name__}: {e}") from e
            if len(values) != len(flat):
                raise RewardFunctionError(f"reward function {self.spec} returned {len(values)} rewards for "
                                          f"{len(flat)} completions")
        else:
            values = [self._one(i, row, c) for (i, row), c in zip(flat_rows, flat)]
        out: list[list[float]] = []
        k = 0
        for i, row in enumerate(rows):
            out.append([self._number(values[k + s], i, row, c) for s, c in enumerate(completions[i])])
            k += len(completions[i])
        return out

    def _one(self, index: int, row: dict[str, Any], completion: str) -> Any:
        try:
            return self.fn(prompt=row["prompt"], completion=completion, answer=row.get("answer"))
        except Exception as e:  # noqa: BLE001 - user code: report it readably, whatever it raised
            raise RewardFunctionError(
                f"reward function {self.spec} raised {type(e).__name__}: {e} on example {index} "
                f"(prompt {row['prompt']!r}, completion {completion!r})"
            ) from e

    def _number(self, value: Any, index: int, row: dict[str, Any], completion: str) -> float:
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise RewardFunctionError(
                f"reward function {self.spec} returned {value!r} ({type(value).__name__}) on example {index} "
                f"(prompt {row['prompt']!r}, completion {completion!r}); it must return a number"
            )
        return float(value)


def load_reward_fn(spec: str | None) -> RewardFunction:
    """The reward function `module:function` names (exact match when None); UsageError when it cannot
    be imported."""
    if not spec:
        return RewardFunction(exact_match, "exact_match", batched=False)
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UsageError(f"--reward_fn {spec!r}: expected module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    try:
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported in one line
        raise UsageError(f"--reward_fn {spec}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise UsageError(f"--reward_fn {spec} is not callable")
    return RewardFunction(fn, spec, _is_batched(fn))


def check_reward_fn(spec: str | None, example: dict[str, Any]) -> RewardFunction:
    """Import the reward function and call it on one example (its reference answer as the completion),
    before anything is written. UsageError naming the function when it fails."""
    reward = load_reward_fn(spec)
    completion = str(example.get("answer", ""))
    try:
        reward.score([example], [[completion]])
    except RewardFunctionError as e:
        raise UsageError(f"--reward_fn {reward.spec} failed on the first prompt row at launch: {e}") from e
    return reward
