"""The strategy plug-in API: what each iteration trains on.

A strategy is a subclass of `itertrain.Strategy`. The smallest one overrides only
`train_rows(iteration)`; the others add a `generate` stage, their own dataset, collator or Trainer
class (TRL's trainers included: itertrain adds its recovery hooks to any Trainer class), their own
flags (`arguments_class`) and their own TrainingArguments subclass (`training_arguments_class`).
Strategies receive what they need through `StrategyContext`, never the CheckpointManager, and take
the model they sample from from the recovery plan (`ModelSource`), never by directory name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from itertrain.args import RunConfig


@dataclass
class ModelSource:
    """A model as the recovery plan names it: where it comes from, its fingerprint, and a loader."""

    path: str  # relative to the output dir, or "base" for --model_name
    fingerprint: str | None
    load: Callable[[], Any]  # the loaded model (loaded once; the loop may hand over one already loaded)


@dataclass(frozen=True)
class Evaluation:
    """An iteration's held-out evaluation: the dataset and the prefix of its metrics (eval_loss, ...)."""

    dataset: Any
    prefix: str = "eval"


@dataclass
class StrategyContext:
    """What a strategy sees of the run."""

    cfg: RunConfig
    root: Path
    tokenizer: Any
    commit_data: Callable[..., Any]  # (directory, iteration, lineage, extra) -> Manifest; rank 0, after the files
    move_aside: Callable[[list[str]], Path | None]  # committed artifacts to superseded/<time>/; rank 0

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids exactly as training and generation see them: BOS first (when the tokenizer
        has one; `tokenizer(prompt)` may leave it out), no EOS. Use it to score or sample in a plug-in."""
        from itertrain.data import prompt_ids

        return prompt_ids(self.tokenizer, prompt)


class Strategy:
    """Base class of iteration strategies. Override `train_rows`; everything else has a default.

    Attributes:
        name: the registry name (set by `register_strategy` when not given).
        defining_fields: argument names that, besides model, strategy and data files, define the
            experiment (a change on resume is refused without --allow_config_change).
        arguments_class: a dataclass of the strategy's own flags (parsed into `ctx.cfg.strategy_args`).
        training_arguments_class: a TrainingArguments subclass (e.g. trl.DPOConfig): its own fields become
            flags under their own names (those itertrain already has keep itertrain's meaning).
        training_defaults: TrainingArguments defaults of this strategy (the YAML file and flags override them).
            Otherwise the fields `training_arguments_class` defaults differently from HF's keep its defaults
            (bf16 and gradient_checkpointing excepted: off unless asked for).
        training_from: fields of `training_arguments_class` that take the value of an itertrain flag of the
            same meaning, as {field: "group.field"} (e.g. {"num_generations": "generation.samples_per_prompt"}).
    """

    name: ClassVar[str] = ""
    defining_fields: ClassVar[tuple[str, ...]] = ()
    arguments_class: ClassVar[type | None] = None
    training_arguments_class: ClassVar[type | None] = None
    training_defaults: ClassVar[dict[str, Any]] = {}
    training_from: ClassVar[dict[str, str]] = {}
    eval_prefix: ClassVar[str] = "eval"  # metric prefix of the loss on eval_rows() (per iteration: `evaluation`)

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx

    # ---- checks before anything is written --------------------------------------------------------------
    @classmethod
    def check_arguments(cls, cfg: RunConfig) -> None:
        """Flag combinations this strategy needs; raise itertrain.errors.UsageError (exit 2)."""

    @classmethod
    def check_unsupported(cls, cfg: RunConfig) -> None:
        """Flags this strategy does not take at all, refused (UsageError) before the checks of how flags
        combine, which would otherwise speak of a flag the strategy never uses."""

    def preflight(self, iteration: int) -> None:
        """Everything about `iteration` that can be checked before anything is written (data files,
        reward functions); raise UsageError. Default: the training (and eval) rows of an iteration
        that does not generate its own data are read and checked."""
        from itertrain import chat
        from itertrain.data import check_rows

        if not self.generates(iteration):
            rows, source = _user_rows(self.train_rows, iteration), self.rows_source(iteration)
            check_rows(rows, source, self.row_shapes(iteration))
            chat.check_rows(rows, self.ctx.tokenizer, source)
        rows = _user_rows(self.eval_rows, iteration)
        if rows is not None:
            check_rows(rows, f"{type(self).__qualname__}.eval_rows({iteration})")
            chat.check_rows(rows, self.ctx.tokenizer, f"{type(self).__qualname__}.eval_rows({iteration})")

    # ---- data ------------------------------------------------------------------------------------------
    def generates(self, iteration: int) -> bool:
        """Whether `iteration` has a `generate` stage."""
        return False

    def generate(self, iteration: int, source: ModelSource) -> dict[str, Any] | None:
        """The `generate` stage: sample from `source` (the previous iteration's model, from the plan),
        score, filter, and commit data/iter_K with `ctx.commit_data`. Returns stats for the metrics."""
        return None

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        """Rows to train iteration `iteration` on: {"prompt", "completion"} (loss on the completion) or
        {"text"} (loss on everything)."""
        raise NotImplementedError(f"{type(self).__qualname__} must override train_rows(iteration)")

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        """Rows for the held-out loss, None for none."""
        return None

    def row_shapes(self, iteration: int) -> tuple[tuple[str, ...], ...]:
        """The keys a row of `train_rows(iteration)` must have, one tuple per accepted shape (default:
        prompt+completion, or text). A prompt-only strategy (GRPO) returns (("prompt",),)."""
        from itertrain.data import ROW_SHAPES

        return ROW_SHAPES

    def rows_source(self, iteration: int) -> str:
        """Where `train_rows(iteration)` come from, for error messages (a file name, say)."""
        return f"{type(self).__qualname__}.train_rows({iteration})"

    def train_dataset(self, iteration: int) -> Any:
        """The training dataset handed to the Trainer (default: `train_rows`, tokenized)."""
        from itertrain.data import build_dataset

        return build_dataset(self.train_rows(iteration), self.ctx.tokenizer, self.ctx.cfg.loop.max_seq_length,
                             source=self.rows_source(iteration))

    def eval_dataset(self, iteration: int) -> Any:
        """The evaluation dataset (default: `eval_rows`, tokenized; None when there are none)."""
        from itertrain.data import build_dataset

        rows = self.eval_rows(iteration)
        if not rows:
            return None
        return build_dataset(rows, self.ctx.tokenizer, self.ctx.cfg.loop.max_seq_length,
                             source=f"{type(self).__qualname__}.eval_rows({iteration})")

    def evaluation(self, iteration: int) -> Evaluation | None:
        """The held-out evaluation of `iteration` (default: `eval_dataset` under `eval_prefix`), None for none.
        Override when the prefix depends on the iteration's data (what is evaluated decides its name)."""
        dataset = self.eval_dataset(iteration)
        return None if dataset is None else Evaluation(dataset, self.eval_prefix)

    def data_collator(self) -> Any:
        """The data collator handed to the Trainer (default: pads each batch with the tokenizer's pad token)."""
        from itertrain.data import PadCollator

        return PadCollator(self.ctx.tokenizer.pad_token_id)

    # ---- training ----------------------------------------------------------------------------------------
    def trainer_class(self) -> type:
        """The Trainer class (itertrain puts its RecoveryHooks in front of it)."""
        from transformers import Trainer

        return Trainer

    def trainer_class_for(self, iteration: int) -> type:
        """The Trainer class of `iteration` (default: `trainer_class()`). Override when iterations train
        differently, as iterative_dpo does (SFT at iteration 0, DPO after)."""
        return self.trainer_class()

    def training_arguments(self, iteration: int, args: Any) -> Any:
        """The TrainingArguments of `iteration` (`args` is the iteration's own copy, seed already set);
        change and return it for per-iteration values (e.g. a learning rate of the SFT iteration only)."""
        return args

    def iteration_lineage(self, iteration: int, source: ModelSource) -> dict[str, Any]:
        """Entries added to the lineage of `iteration`'s checkpoints and model, for what they depend on
        but do not hold (e.g. the fingerprint of a reference model). `source`: the previous model. Called
        on every rank as the `train` stage starts, before `train_dataset` and `trainer_kwargs`."""
        return {}

    def check_restored(self, iteration: int, source: ModelSource, lineage: dict[str, Any], checkpoint: str) -> None:
        """Before anything is written, when a launch restores `checkpoint` of `iteration` in full: raise
        RecoveryRefused (exit 2) when it cannot be continued here; `lineage` is what the checkpoint recorded."""

    def trainer_kwargs(self, iteration: int, model: Any, args: Any) -> dict[str, Any]:
        """Keyword arguments for the trainer, besides model, args, datasets, collator, tokenizer and
        callbacks (e.g. a reference model)."""
        return {"data_collator": self.data_collator(), "processing_class": self.ctx.tokenizer}

    def trainer_kwargs_for(self, iteration: int, model: Any, args: Any, source: ModelSource) -> dict[str, Any]:
        """`trainer_kwargs` for `iteration`, whose previous model is `source` (default: `trainer_kwargs`).
        Override when the trainer needs a model the plan names, as iterative_dpo's reference model."""
        return self.trainer_kwargs(iteration, model, args)

    def save_step_multiple(self, iteration: int, args: Any) -> int:
        """Checkpoints of `iteration` are taken only at multiples of this many optimizer steps (a preemption
        too stops at the next one): state that no checkpoint holds, such as GRPO's buffered generations,
        is then empty at every checkpoint. Default 1 (any step)."""
        return 1

    def training_metrics(self, iteration: int, state: Any) -> dict[str, float]:
        """Metrics of `iteration` from its trainer's state once training ended (e.g. means over
        `state.log_history`, which a checkpoint keeps across a resume). Called on every rank."""
        return {}

    def task_metrics(self, iteration: int, model: Any) -> dict[str, float]:
        """Extra held-out metrics (e.g. exact-match accuracy). Called on every rank."""
        return {}

    def checked_task_metrics(self, iteration: int, model: Any) -> dict[str, float]:
        """`task_metrics`, as the loop calls it: a failure of the strategy's code is the user's (one line
        naming the method, exit 1, not retried by torchrun); the iteration's checkpoints stay committed."""
        from itertrain.errors import ItertrainError, TrainingFailed

        try:
            return self.task_metrics(iteration, model)
        except ItertrainError:
            raise
        except Exception as e:  # noqa: BLE001 - user code: reported in one line, whatever it raised
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrainingFailed(
                f"{type(self).__qualname__}.task_metrics({iteration}) raised {type(e).__name__}: {first}. Iteration "
                f"{iteration} trained but its model is not committed (its checkpoints are); fix it and relaunch "
                "with --resume_from auto --resume_from_iteration auto") from e


def _user_rows(fn: Callable[[int], Any], iteration: int) -> Any:
    """`fn(iteration)` of a strategy; whatever it raises (other than itertrain's own errors) is a usage
    error naming the method: one line, exit 2, before anything is written."""
    from itertrain.errors import ItertrainError, UsageError

    try:
        return fn(iteration)
    except ItertrainError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: reported in one line, whatever it raised
        name = f"{type(fn.__self__).__qualname__}.{fn.__name__}({iteration})"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{name} raised {type(e).__name__}: {first}. Nothing was written; fix it and "
                         "relaunch the same command") from e
