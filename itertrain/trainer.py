"""itertrain's hooks into HF Trainer, for any Trainer subclass (TRL's included): a mixin and a callback.

`RecoveryHooks` overrides five private Trainer methods, each a few lines around `super()`:
1. `_load_from_checkpoint`: a no-op. itertrain loads the starting weights from
   `RecoveryPlan.weights_from` before training (scenario 5 takes them from an iteration model while
   the training state comes from a checkpoint), so HF must not overwrite them.
2. `_save_checkpoint`: the CheckpointManager frees the target directory first (a stale checkpoint
   of an older iteration with the same step moves into its iter_K/, never overwritten in place), and
   a failed write becomes one line naming the path and the cause. With `--async_save`, HF's own
   `_save_checkpoint` (the trainer class's, TRL's included) runs inside `AsyncSaver.capturing`, and the
   background writer commits the checkpoint (`artifacts/async_save.py`).
3. `_save`: with `--async_save`, the weights are copied to host memory and HF's own `_save` writes
   them from the copy on the background writer.
4. `_save_optimizer_and_scheduler`: a fault point inside the save, for the crash harness; with
   `--async_save`, HF's own method runs on the background writer against copies of the state dicts.
5. `_finalize_training`: waits for a background checkpoint write first (HF may load the best checkpoint
   from disk there).
`CommitCallback` commits each checkpoint HF wrote synchronously. `with_recovery_hooks(cls)` puts the mixin
in front of any Trainer class; tests on the lowest supported transformers guard the overrides.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from itertrain import distributed, faults, preemption
from itertrain.artifacts.manager import CheckpointManager
from itertrain.errors import ArtifactWriteError, UsageError
from itertrain.fsutil import describe_library_write_error
from itertrain.layout import checkpoint_name
from itertrain.preemption import PreemptionCallback

HOOKED = ("_save_checkpoint", "_save", "_save_optimizer_and_scheduler", "_load_from_checkpoint", "_finalize_training")


def _restore_indexed_cpu_locations() -> None:
    """Let torch.load take `map_location=torch.device("cpu", N)`. HF Trainer before transformers 5.18
    loads a multi-process CPU run's optimizer state with map_location=args.device, which is "cpu:0",
    and torch knows no such location ("don't know how to restore data location ... cpu:0"): every
    2-rank CPU resume failed. Public torch API; it only adds a location torch otherwise refuses."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release >= (5, 18):
        return

    def tag(storage):  # never claims a storage when saving
        return None

    def restore(storage, location: str):
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(90, tag, restore)


_restore_indexed_cpu_locations()


class RecoveryHooks:
    """Mixin: `class MyTrainer(RecoveryHooks, SomeTrainer)`. The loop sets `itertrain_checkpoints`."""

    itertrain_checkpoints: CheckpointManager | None = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        return  # the weights came from RecoveryPlan.weights_from, loaded once before training

    def _save_checkpoint(self, model, trial):
        manager = self.itertrain_checkpoints
        if manager is None:
            raise RuntimeError("RecoveryHooks: the trainer was built without itertrain's CheckpointManager")
        step = self.state.global_step  # type: ignore[attr-defined]
        saver = manager.saver
        if saver is not None and _async_refused(self, saver.unsupported(self, trial)):
            saver = None
        if saver is not None:
            saver.wait()  # every rank: the previous checkpoint is written (and committed on rank 0)
        manager.before_save(step)
        faults.point("checkpoint.save")
        try:
            if saver is None:
                super()._save_checkpoint(model, trial)  # type: ignore[misc]
                return
            with saver.capturing(self, manager.root / checkpoint_name(step)) as capture:
                super()._save_checkpoint(model, trial)  # type: ignore[misc]
            best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
            # a preemption checkpoint is marked as such in its manifest, as on the synchronous path
            saver.start(capture, manager.checkpoint_committer(step, preemption.checkpoint_extra(step)), best)
        except ArtifactWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - torch/safetensors report a full disk as their own errors
            message = describe_library_write_error(e, manager.root / checkpoint_name(step))
            if message is None:
                raise
            raise ArtifactWriteError(message) from e

    def _save(self, output_dir=None, state_dict=None):
        manager = self.itertrain_checkpoints
        saver = manager.saver if manager is not None else None
        if saver is not None and saver.defer_weights(self, output_dir, state_dict, super()._save):  # type: ignore[misc]
            return  # --async_save: HF's _save runs on the writer, with the weights as they are now
        super()._save(output_dir, state_dict)  # type: ignore[misc]

    def _save_optimizer_and_scheduler(self, output_dir):
        manager = self.itertrain_checkpoints
        saver = manager.saver if manager is not None else None
        hf_method = super()._save_optimizer_and_scheduler.__func__  # type: ignore[misc]
        if saver is not None and saver.defer_optimizer(self, output_dir, hf_method):
            return  # --async_save: the fault point and HF's method run on the writer
        faults.point("checkpoint.optimizer")  # the weights are written, the optimizer is not yet
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]

    def _finalize_training(self, *args, **kwargs):
        if self.itertrain_checkpoints is not None:
            self.itertrain_checkpoints.wait()  # the last checkpoint is on disk before HF may read it
        return super()._finalize_training(*args, **kwargs)  # type: ignore[misc]


def _async_refused(trainer: Any, reason: str | None) -> bool:
    """True (and said once, by rank 0) when `--async_save` cannot snapshot this trainer's checkpoints."""
    if reason is None:
        return False
    if not getattr(trainer, "_itertrain_async_refusal_said", False):
        trainer._itertrain_async_refusal_said = True
        if distributed.is_main():
            print(f"itertrain: --async_save is not available with {reason}; checkpoints are saved by HF Trainer "
                  "synchronously", flush=True)
    return True


def check_hooks(trainer_class: type) -> None:
    """Refuse a trainer class in which another class overrides a hooked method ahead of the mixin:
    its saves would bypass the commit protocol silently."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise UsageError(f"{trainer_class!r} is not a transformers.Trainer subclass")
    ahead = [f"{owner.__qualname__}.{name}" for name in HOOKED
             if (owner := next(c for c in trainer_class.__mro__ if name in vars(c))) is not RecoveryHooks]
    if ahead:
        raise UsageError(
            f"{trainer_class.__module__}.{trainer_class.__qualname__}: {', '.join(ahead)} "
            f"{'comes' if len(ahead) == 1 else 'come'} before itertrain's RecoveryHooks in the method order, so "
            "checkpoints would bypass the commit protocol. Put RecoveryHooks first (class MyTrainer(RecoveryHooks, "
            "...)) or return the plain Trainer class and let itertrain add the hooks."
        )


def with_recovery_hooks(trainer_class: type) -> type:
    """`trainer_class` with RecoveryHooks first in its method order (a subclass is made when needed)."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise UsageError(f"{trainer_class!r} is not a transformers.Trainer subclass")
    if not issubclass(trainer_class, RecoveryHooks):
        trainer_class = type(trainer_class.__name__, (RecoveryHooks, trainer_class),
                             {"__module__": trainer_class.__module__, "__doc__": trainer_class.__doc__})
    check_hooks(trainer_class)
    return trainer_class


def attach(trainer: Any, manager: CheckpointManager, every: int = 1) -> Any:
    """Give a constructed trainer its CheckpointManager and the commit callback; refuse one without the hooks.
    `every`: a preemption stops at the next multiple of this many steps (`Strategy.save_step_multiple`)."""
    if not isinstance(trainer, RecoveryHooks):
        raise UsageError(
            f"the strategy's trainer is a {type(trainer).__qualname__}, without itertrain's RecoveryHooks: "
            "return a Trainer class from trainer_class() (itertrain adds the hooks), or derive from "
            "itertrain.RecoveryHooks"
        )
    check_hooks(type(trainer))
    trainer.itertrain_checkpoints = manager
    trainer.add_callback(CommitCallback(manager))
    if preemption.enabled():
        trainer.add_callback(PreemptionCallback(every))  # after CommitCallback: see PreemptionCallback
    return trainer


class CommitCallback(TrainerCallback):
    """Commits each trainer checkpoint right after HF Trainer wrote it."""

    def __init__(self, manager: CheckpointManager):
        self.manager = manager

    def on_save(self, args, state, control, **kwargs):
        saver = self.manager.saver
        if saver is not None and saver.last_step == state.global_step:
            return control  # --async_save: the background writer commits it once its files are durable
        best = state.best_model_checkpoint
        self.manager.commit_checkpoint(state.global_step, os.path.basename(best) if best else None,
                                       preemption.checkpoint_extra(state.global_step))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.manager.wait()  # the last checkpoint is written and committed before training returns
        if self.manager.saver is not None:
            self.manager.saver.release()  # the host buffers are not held between iterations
        return control


class FaultPointCallback(TrainerCallback):
    """The fault point `train.step` after every optimizer step (a kill in the middle of training)."""

    def on_step_end(self, args, state, control, **kwargs):
        faults.point("train.step")
        return control


def gathered_weights(trainer: Any) -> dict | None:
    """The whole model's weights when they are sharded across ranks (FSDP, DeepSpeed): a collective,
    every rank calls it; rank 0 receives the full tensors. None when every rank holds them whole."""
    if not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)
