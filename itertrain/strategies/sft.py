"""`--strategy sft`: iteration K trains on --train_file (which may contain {iteration}), on --dataset_name,
or on a built-in task's labeled data."""

from __future__ import annotations

from typing import Any

from itertrain.data import read_jsonl, resolve_path
from itertrain.sources import dataset_rows, describe
from itertrain.errors import UsageError
from itertrain.strategies.base import Evaluation, Strategy


class SFTStrategy(Strategy):
    name = "sft"

    @classmethod
    def check_arguments(cls, cfg) -> None:
        if not cfg.loop.train_file and not cfg.loop.dataset_name and not cfg.loop.task:
            raise UsageError(f"--strategy {cls.name} needs --train_file (JSONL with prompt/completion, text or "
                             "messages), --dataset_name (a dataset directory, data file or cached Hub id), or --task "
                             "arithmetic")

    def task(self):
        from itertrain.tasks import get_task

        return get_task(self.ctx.cfg.loop.task, self.ctx.cfg.training.seed) if self.ctx.cfg.loop.task else None

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        loop = self.ctx.cfg.loop
        if loop.train_file:
            return read_jsonl(resolve_path(loop.train_file, iteration))
        if loop.dataset_name:
            return dataset_rows(loop.dataset_name, loop.dataset_config, loop.dataset_split)
        return self.task().labeled_rows()

    def rows_source(self, iteration: int) -> str:
        loop = self.ctx.cfg.loop
        if loop.dataset_name:
            return describe(loop.dataset_name, loop.dataset_config, loop.dataset_split)
        return resolve_path(loop.train_file, iteration) if loop.train_file else f"task {loop.task}"

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        loop = self.ctx.cfg.loop
        if loop.eval_file:
            return read_jsonl(resolve_path(loop.eval_file, iteration))
        if loop.task:
            return self.task().eval_rows()
        # No held-out file: report the loss on (at most 128 of) the training rows, under its own name.
        return self.train_rows(iteration)[:128]

    def evaluation(self, iteration: int) -> Evaluation | None:
        found = super().evaluation(iteration)
        held_out = self.ctx.cfg.loop.eval_file or self.ctx.cfg.loop.task
        return found if found is None or held_out else Evaluation(found.dataset, "eval_train")

    def task_metrics(self, iteration: int, model) -> dict[str, float]:
        if not self.ctx.cfg.loop.task:
            return {}
        from itertrain.generation import heldout_accuracy

        return heldout_accuracy(self.task(), model, self.ctx)
