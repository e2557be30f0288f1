"""The strategy interface: a strategy supplies data (and may generate it) and task metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itertrain.args import RunConfig
from itertrain.checkpointing import CheckpointManager


@dataclass
class LoopContext:
    """What every stage of an iteration can see."""

    cfg: RunConfig
    root: Path
    tokenizer: Any
    manager: CheckpointManager


class Strategy(ABC):
    name = "base"
    eval_prefix = "eval"  # metric prefix of the loss on eval_rows()

    def __init__(self, ctx: LoopContext):
        self.ctx = ctx

    def generates(self, iteration: int) -> bool:
        """Whether iteration `iteration` has a `generate` stage."""
        return False

    def generate(self, iteration: int, model, weights_from: str) -> dict[str, Any] | None:
        """The `generate` stage (sample, score, filter, commit data/iter_K). None: no such stage.

        `model` holds the weights this launch starts from (`weights_from`, relative to the output dir)."""
        return None

    @abstractmethod
    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        """Rows (prompt/completion or text) to train iteration `iteration` on."""

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        """Rows for the held-out loss, None for none."""
        return None

    def task_metrics(self, iteration: int, model) -> dict[str, float]:
        """Extra held-out metrics (e.g. exact-match accuracy). Called on every rank."""
        return {}
