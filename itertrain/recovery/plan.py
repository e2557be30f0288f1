"""The recovery plan: what a launch starts from, and why (the result of `decide`). Pure.

Built only through its named constructors, one per kind of plan, so that a plan always says what
really happens: `Mode.BOTH` means weights from an iteration model *and* state from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from itertrain.recovery.discover import IterationModel, TrainerCheckpoint
from itertrain.recovery.flags import BASE


class Mode(str, Enum):
    """The guide's recovery priorities, plus 'complete'."""

    FRESH = "fresh"  # neither: train from scratch
    CHECKPOINT = "checkpoint"  # trainer checkpoint: weights and full state from it
    ITERATION = "iteration"  # iteration model (or the base model under --iteration_init base): fresh state
    BOTH = "both"  # iteration model weights + training state from a checkpoint
    COMPLETE = "complete"  # nothing left to run


class StateScope(str, Enum):
    NONE = "none"  # fresh optimizer, scheduler, progress, RNG
    FULL = "full"  # optimizer, scheduler, progress (step, epoch, data position), RNG of every rank
    OPTIMIZER = "optimizer_moments"  # across an iteration boundary: moments only, schedule restarts


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RecoveryPlan:
    mode: Mode
    iteration: int  # the iteration to run (for COMPLETE: the number of iterations done)
    step: int  # the optimizer step within it to continue at
    weights_from: str  # BASE, or a path relative to the output dir
    state_from: str | None = None
    state_scope: StateScope = StateScope.NONE
    reason: str
    checkpoint: TrainerCheckpoint | None = None  # the checkpoint found and used
    iteration_model: IterationModel | None = None  # the iteration model found and used
    previous_model: str | None = None  # the model of iteration-1: what this iteration's data is generated from
    warnings: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    supersedes: tuple[str, ...] = ()  # committed artifacts this run replaces: moved to superseded/ first
    weights_override: bool = False  # full state from a checkpoint, weights from elsewhere (scenario 5)
    # LoRA (--use_peft): the weights are a full model plus an adapter.
    lora: str | None = None  # the --iteration_model mode (merged | adapter); None: full fine-tuning
    adapter_base: str | None = None  # the full model the adapter applies to: BASE or an iteration model
    adapter_from: str | None = None  # the adapter's weights: a checkpoint or an adapter-only iter_K; None: fresh

    # ---- named constructors ---------------------------------------------------------------------------
    @classmethod
    def fresh(cls) -> RecoveryPlan:
        return cls(mode=Mode.FRESH, iteration=0, step=0, weights_from=BASE,
                   reason="no checkpoint and no iteration model selected: training from scratch")

    @classmethod
    def restore(cls, ckpt: TrainerCheckpoint, *, reason: str, model: IterationModel | None = None,
                previous_model: str | None = None, supersedes: tuple[str, ...] = ()) -> RecoveryPlan:
        """Weights and full training state from `ckpt`: continue its iteration at its step."""
        return cls(mode=Mode.CHECKPOINT, iteration=ckpt.iteration, step=ckpt.step, weights_from=ckpt.path,
                   state_from=ckpt.path, state_scope=StateScope.FULL, reason=reason, checkpoint=ckpt,
                   iteration_model=model, previous_model=previous_model, supersedes=supersedes)

    @classmethod
    def next_iteration(cls, model: IterationModel, *, weights: str, reason: str, ckpt: TrainerCheckpoint | None = None,
                       moments_from: TrainerCheckpoint | None = None, warnings: tuple[str, ...] = (),
                       supersedes: tuple[str, ...] = ()) -> RecoveryPlan:
        """Iteration K+1 from step 0: weights from iter_K (or the base model), optimizer moments from
        `moments_from` when given (BOTH), else a fresh state (ITERATION). `ckpt`: found but not used."""
        return cls(mode=Mode.BOTH if moments_from else Mode.ITERATION, iteration=model.iteration + 1, step=0,
                   weights_from=weights, state_from=moments_from.path if moments_from else None,
                   state_scope=StateScope.OPTIMIZER if moments_from else StateScope.NONE, reason=reason,
                   checkpoint=moments_from or ckpt, iteration_model=model, previous_model=model.path,
                   warnings=warnings, supersedes=supersedes)

    @classmethod
    def override(cls, model: IterationModel, ckpt: TrainerCheckpoint, *, reason: str, warnings: tuple[str, ...],
                 supersedes: tuple[str, ...]) -> RecoveryPlan:
        """Scenario 5 as written: weights from iter_K, full state from a checkpoint of iteration K+1."""
        return cls(mode=Mode.BOTH, iteration=ckpt.iteration, step=ckpt.step, weights_from=model.path,
                   state_from=ckpt.path, state_scope=StateScope.FULL, reason=reason, checkpoint=ckpt,
                   iteration_model=model, previous_model=model.path, warnings=warnings, supersedes=supersedes,
                   weights_override=True)

    @classmethod
    def complete(cls, done: int, num_iterations: int, *, weights_from: str, ckpt: TrainerCheckpoint | None,
                 model: IterationModel | None) -> RecoveryPlan:
        return cls(mode=Mode.COMPLETE, iteration=done, step=0, weights_from=weights_from,
                   reason=f"the experiment is complete: iterations 0..{done - 1} are committed and --num_iterations "
                          f"is {num_iterations} (raise --num_iterations to train further)",
                   checkpoint=ckpt, iteration_model=model)

    # ---- reading ---------------------------------------------------------------------------------------------
    def with_(self, **changes) -> RecoveryPlan:
        return replace(self, **changes)

    @property
    def to_verify(self) -> tuple[str, ...]:
        """Artifacts whose bytes must be deep-verified before use."""
        out = []
        if self.weights_from != BASE:
            out.append(self.weights_from)
        if self.state_from and self.state_from not in out:
            out.append(self.state_from)
        for rel in (self.adapter_base, self.adapter_from):  # LoRA: both halves of the weights
            if rel and rel != BASE and rel not in out:
                out.append(rel)
        # At an iteration's start, a strategy that generates samples from the previous model.
        if self.previous_model and self.previous_model not in out and self.mode in (Mode.ITERATION, Mode.BOTH):
            out.append(self.previous_model)
        return tuple(out)

    def describe_resume(self) -> str:
        if self.mode == Mode.COMPLETE:
            return f"nothing to run: {self.iteration} iteration(s) complete"
        return f"iteration {self.iteration}, step {self.step}"
