"""The train stage of one iteration: the strategy's Trainer class behind itertrain's hooks, its
TrainingArguments (the iteration's own seed, itertrain's rotation instead of HF's) and callbacks, and
training itself, with a library's failure turned into the ItertrainError a user can act on.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from itertrain import distributed, trackers
from itertrain.args import RunConfig
from itertrain.artifacts.manager import CheckpointManager
from itertrain.errors import ArtifactWriteError, ItertrainError, TrainingFailed, UsageError
from itertrain.fsutil import describe_library_write_error
from itertrain.metrics import IterationLossCallback, TensorBoardCallback, finished_state, iteration_train_loss, tensorboard_dir
from itertrain.recovery.plan import StateScope
from itertrain.recovery.resolve import Resolved
from itertrain.recovery.restore import OptimizerMomentsCallback
from itertrain.strategies import ModelSource, Strategy
from itertrain.trainer import FaultPointCallback, attach, with_recovery_hooks


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:400]


def iteration_training_args(cfg: RunConfig, iteration: int):
    """The user's TrainingArguments for one iteration: its own seed, our rotation instead of HF's."""
    args = copy.copy(cfg.training)
    args.seed = cfg.training.seed + iteration
    if cfg.training.data_seed is not None:
        args.data_seed = cfg.training.data_seed + iteration
    args.save_total_limit = None  # rotation runs after our commit, never on uncommitted checkpoints
    args.push_to_hub = False  # itertrain pushes each committed iteration model itself (itertrain.hub)
    return args


def iteration_config(cfg: RunConfig, strategy: Strategy, iteration: int) -> RunConfig:
    """`cfg` as iteration `iteration` trains with it: the strategy's own values for that iteration (an SFT
    iteration 0's --sft_max_steps / --sft_learning_rate) in place of the flags they override, so that what is
    recorded and reported as the iteration's hyperparameters is what it trains with."""
    return dataclasses.replace(cfg, training=strategy.training_arguments(iteration, copy.copy(cfg.training)))


def _no_hf_rotation(strategy: Strategy, args: Any, hook: str) -> None:
    """HF's own rotation would delete checkpoints before they are committed: itertrain rotates after
    its commit (--save_total_limit on the command line). A strategy hook may not turn HF's back on."""
    if getattr(args, "save_total_limit", None) is not None:
        raise UsageError(
            f"strategy {type(strategy).__name__}: {hook} set save_total_limit={args.save_total_limit} on the "
            "TrainingArguments; HF Trainer would then delete checkpoints before itertrain commits them. Leave it "
            "unset in the strategy and pass --save_total_limit on the command line (itertrain rotates after each commit)"
        )


def _reports_to_tensorboard(args) -> bool:
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    return "tensorboard" in report_to or "all" in report_to


def build_trainer(strategy: Strategy, manager: CheckpointManager, resolved: Resolved, k: int, train_ds, eval_ds,
                  source: ModelSource):
    """The strategy's Trainer class with itertrain's hooks, for iteration k."""
    cfg, root, plan = strategy.ctx.cfg, strategy.ctx.root, resolved.plan
    args = strategy.training_arguments(k, iteration_training_args(cfg, k))
    _no_hf_rotation(strategy, args, "training_arguments")
    callbacks: list[Any] = [FaultPointCallback()]
    if plan.state_scope == StateScope.OPTIMIZER and plan.state_from:
        callbacks.append(OptimizerMomentsCallback(root / plan.state_from))
    if _reports_to_tensorboard(args):
        # HF's own TensorBoard integration writes into the experiment's one tree, not runs/<date>_<host>:
        # transformers 5 reads the directory from the environment, 4.x from args.logging_dir.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(root, k))
        if hasattr(args, "logging_dir"):
            args.logging_dir = os.environ["TENSORBOARD_LOGGING_DIR"]
    elif distributed.is_main():
        callbacks.append(TensorBoardCallback(root, k))
    cls = with_recovery_hooks(strategy.trainer_class_for(k))
    kwargs = strategy.trainer_kwargs_for(k, resolved.model, args, source)
    _no_hf_rotation(strategy, args, "trainer_kwargs")
    trainer = cls(model=resolved.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks,
                  **kwargs)
    _no_hf_rotation(strategy, trainer.args, "its Trainer class")
    trainer.callback_handler.callbacks.insert(0, IterationLossCallback())  # before HF's printers
    trackers.attach(trainer, root, k)  # the experiment's step axis and tracker run, not the iteration's
    return attach(trainer, manager, every=strategy.save_step_multiple(k, trainer.args))


def train(trainer: Any, resume: str | None, k: int, cfg: RunConfig) -> float:
    """Train iteration k (from the checkpoint `resume`, restored in full, when given); its training loss.
    A library's failure becomes the ItertrainError a user can act on."""
    try:
        finished = finished_state(resume, trainer.args.max_steps)
        if finished is not None:
            # The checkpoint is the iteration's last step: nothing is left to train (HF Trainer would
            # run one extra step when resumed at max_steps). An iteration model rebuilt this way is
            # byte-identical to the one the iteration committed. No rank trains, so nothing else holds
            # rank 0 back: every rank reads the checkpoint before rank 0's commit moves it into iter_K.
            distributed.barrier()
            trainer.state = finished
            return iteration_train_loss(finished, float("nan"))
        return trainer.train(resume_from_checkpoint=resume).training_loss
    except ItertrainError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed write inside a library, or training itself failed
        message = describe_library_write_error(e, cfg.output_dir)
        if message is not None:
            raise ArtifactWriteError(f"training of iteration {k} failed while writing: {message}") from e
        own = TrainingFailed(f"training of iteration {k} failed: {type(e).__name__}: {first_line(e)}")
        raise distributed.training_failure(e, f"training iteration {k}", cfg.dist.dist_timeout_s, own) from e

