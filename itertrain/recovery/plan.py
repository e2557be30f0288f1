"""The recovery decision (SPEC §3): a pure function from (flags, inventory) to a RecoveryPlan.

No torch, no file access: everything it needs is in `RecoveryFlags` and the `Inventory`. The four
rules, in order:

1. an explicit value (`S`, `iter_K`) is obeyed as written;
2. otherwise the weights come from whichever artifact is newer (iteration model vs checkpoint);
3. training state applies in full within the iteration it belongs to; across an iteration
   boundary only the optimizer moments carry over;
4. `auto` only considers candidates consistent with an explicit value on the other flag.

`decide` is called again with `rejected` growing when verification or loading of a chosen
artifact fails (auto only): that is the fallback to the next older candidate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from itertrain.errors import RecoveryRefused, UsageError
from itertrain.recovery.discover import Inventory, IterationModel, TrainerCheckpoint

AUTO, NONE = "auto", "none"
_STEP_RE = re.compile(r"^[0-9]+$")
_ITER_RE = re.compile(r"^iter_[0-9]+$")
BASE = "base"  # weights_from value meaning --model_name


def parse_resume_from(value: str) -> str:
    """Validate --resume_from: auto | none | a non-negative integer step."""
    v = str(value).strip()
    if v.lower() in (AUTO, NONE):
        return v.lower()
    if _STEP_RE.match(v):
        return str(int(v))
    raise UsageError(
        f"--resume_from {value!r} is not valid: use 'auto' (newest trainer checkpoint), 'none', "
        "or a step number such as 20 (meaning checkpoint-20)"
    )


def parse_resume_from_iteration(value: str) -> str:
    """Validate --resume_from_iteration: auto | none | iter_K."""
    v = str(value).strip()
    if v.lower() in (AUTO, NONE):
        return v.lower()
    if _ITER_RE.match(v):
        return f"iter_{int(v[5:])}"
    raise UsageError(
        f"--resume_from_iteration {value!r} is not valid: use 'auto' (newest complete iteration model), "
        "'none', or iter_K such as iter_2"
    )


@dataclass(frozen=True)
class RecoveryFlags:
    resume_from: str = NONE
    resume_from_iteration: str = NONE
    overwrite_output_dir: bool = False
    num_iterations: int = 1
    iteration_init: str = "previous"  # previous | base

    def __post_init__(self) -> None:
        object.__setattr__(self, "resume_from", parse_resume_from(self.resume_from))
        object.__setattr__(self, "resume_from_iteration", parse_resume_from_iteration(self.resume_from_iteration))

    @property
    def any_auto(self) -> bool:
        return AUTO in (self.resume_from, self.resume_from_iteration)


class Mode(str, Enum):
    """The guide's recovery priorities, plus 'complete'."""

    FRESH = "fresh"  # neither: train from scratch
    CHECKPOINT = "checkpoint"  # trainer checkpoint only: full restore
    ITERATION = "iteration"  # iteration model only: weights, fresh state
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


@dataclass(frozen=True)
class RecoveryPlan:
    mode: Mode
    iteration: int  # the iteration to run (for COMPLETE: the number of iterations done)
    step: int  # the optimizer step within it to continue at
    weights_from: str  # BASE, or a path relative to the output dir
    state_from: str | None
    state_scope: StateScope
    reason: str
    checkpoint: TrainerCheckpoint | None = None  # the checkpoint found and used
    iteration_model: IterationModel | None = None  # the iteration model found and used
    warnings: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    supersedes: tuple[str, ...] = ()  # committed checkpoints this run will replace (moved aside first)
    weights_override: bool = False  # full state from a checkpoint, weights from elsewhere (scenario 5)

    @property
    def to_verify(self) -> tuple[str, ...]:
        """Artifacts whose bytes must be deep-verified before use."""
        out = []
        if self.weights_from != BASE:
            out.append(self.weights_from)
        if self.state_from and self.state_from not in out:
            out.append(self.state_from)
        return tuple(out)

    def describe_resume(self) -> str:
        if self.mode == Mode.COMPLETE:
            return f"nothing to run: {self.iteration} iteration(s) complete"
        return f"iteration {self.iteration}, step {self.step}"


@dataclass
class _Candidates:
    checkpoints: list[TrainerCheckpoint] = field(default_factory=list)
    models: list[IterationModel] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def _checkpoint_order(c: TrainerCheckpoint) -> tuple:
    """Newest = highest iteration; within it, committed ones by step, and (older, adopted) checkpoints
    written by other tools by modification time (SPEC §3). Top-level copies before kept ones."""
    return (c.iteration, not c.foreign, c.mtime if c.foreign else c.step, "/" not in c.path)


def _newest_checkpoint(cands: list[TrainerCheckpoint]) -> TrainerCheckpoint | None:
    return max(cands, key=_checkpoint_order, default=None)


def _newest_model(cands: list[IterationModel]) -> IterationModel | None:
    return max(cands, key=lambda m: (m.iteration, not m.foreign, m.mtime), default=None)


def _candidates(inv: Inventory, rejected: Mapping[str, str]) -> _Candidates:
    c = _Candidates()
    for ckpt in inv.checkpoints:
        if ckpt.path in rejected:
            c.rejected.append(Rejection(ckpt.path, rejected[ckpt.path]))
        elif ckpt.status.usable:
            c.checkpoints.append(ckpt)
        else:
            c.rejected.append(Rejection(ckpt.path, f"{ckpt.status.value}: {ckpt.problem}"))
    for model in inv.iteration_models:
        if model.path in rejected:
            c.rejected.append(Rejection(model.path, rejected[model.path]))
        elif model.status.usable:
            c.models.append(model)
        else:
            c.rejected.append(Rejection(model.path, f"{model.status.value}: {model.problem}"))
    return c


def _refuse_explicit(flag: str, value: str, what: str, inv: Inventory) -> RecoveryRefused:
    return RecoveryRefused(
        f"{flag} {value}: {what}. What exists in {inv.output_dir}: {inv.describe()}. "
        f"Use {flag} auto to pick the newest usable one, or name one that exists."
    )


def _explicit_model(value: str, inv: Inventory, rejected: Mapping[str, str]) -> IterationModel:
    k = int(value[5:])
    found = [m for m in inv.iteration_models if m.path == value] or [
        m for m in inv.iteration_models if m.iteration == k and m.path != value
    ]
    if not found:
        raise _refuse_explicit("--resume_from_iteration", value, f"{value} does not exist", inv)
    model = _newest_model(found) if len(found) > 1 else found[0]
    if model.path in rejected:
        raise _refuse_explicit("--resume_from_iteration", value, f"{model.path} failed: {rejected[model.path]}", inv)
    if not model.status.usable:
        raise _refuse_explicit(
            "--resume_from_iteration", value, f"{model.path} is {model.status.value} ({model.problem})", inv
        )
    return model


def _explicit_checkpoint(
    value: str, inv: Inventory, rejected: Mapping[str, str], model: IterationModel | None
) -> TrainerCheckpoint:
    step = int(value)
    found = [c for c in inv.checkpoints if c.step == step]
    if not found:
        raise _refuse_explicit("--resume_from", value, f"checkpoint-{step} does not exist", inv)
    if model is not None:
        consistent = [c for c in found if c.iteration <= model.iteration + 1]
        found = consistent or found
    usable = [c for c in found if c.status.usable and c.path not in rejected]
    if not usable:
        c = found[0]
        why = rejected.get(c.path) or f"{c.status.value} ({c.problem})"
        raise _refuse_explicit("--resume_from", value, f"{c.path} cannot be used: {why}", inv)
    return _newest_checkpoint(usable)  # type: ignore[return-value]


def _newest_model_iteration(inv: Inventory) -> int:
    return max((m.iteration for m in inv.iteration_models if m.status.usable), default=-1)


def _superseded(inv: Inventory, iteration: int, step: int, keep: str | None) -> tuple[str, ...]:
    """Top-level checkpoints of the iteration about to run, newer than where it continues: the
    run will write checkpoints with their names, so they are moved aside, never overwritten."""
    return tuple(
        c.path
        for c in inv.checkpoints
        if "/" not in c.path
        and c.path != keep
        and c.status.usable
        and c.iteration == iteration
        and c.step > step
    )


def decide(flags: RecoveryFlags, inv: Inventory, rejected: Mapping[str, str] | None = None) -> RecoveryPlan:
    """The recovery plan for these flags and this inventory (SPEC §3). Raises RecoveryRefused."""
    rejected = dict(rejected or {})
    cands = _candidates(inv, rejected)
    rf, ri = flags.resume_from, flags.resume_from_iteration
    warnings: list[str] = []

    # Rule 1: explicit values are obeyed as written (errors if missing, torn or failed).
    model = _explicit_model(ri, inv, rejected) if ri not in (AUTO, NONE) else None
    ckpt = _explicit_checkpoint(rf, inv, rejected, model) if rf not in (AUTO, NONE) else None

    # Rule 4: auto only considers candidates consistent with an explicit value on the other flag.
    if ri == AUTO:
        models = cands.models
        if ckpt is not None:
            models = [m for m in models if m.iteration >= ckpt.iteration - 1]
        model = _newest_model(models)
    if rf == AUTO:
        ckpts = cands.checkpoints
        if model is not None and ri != AUTO:
            ckpts = [c for c in ckpts if c.iteration <= model.iteration + 1]
        if ri == NONE:
            # Without an iteration model, a checkpoint of an already committed iteration cannot be
            # continued without retraining (and replacing) that iteration's model.
            done = _newest_model_iteration(inv)
            ckpts = [c for c in ckpts if c.iteration > done]
        ckpt = _newest_checkpoint(ckpts)

    plan = _table(flags, inv, ckpt, model, warnings)
    if plan.mode != Mode.COMPLETE and plan.iteration >= flags.num_iterations:
        done = plan.iteration
        plan = RecoveryPlan(
            Mode.COMPLETE, done, 0, plan.weights_from, None, StateScope.NONE,
            f"the experiment is complete: iterations 0..{done - 1} are committed and --num_iterations is "
            f"{flags.num_iterations} (raise --num_iterations to train further)",
            ckpt, model,
        )
    if plan.mode == Mode.FRESH and inv.has_committed_progress and not flags.overwrite_output_dir:
        raise RecoveryRefused(
            f"refusing to start from scratch: {inv.output_dir} holds committed progress "
            f"({inv.describe()}). To continue it, run with --resume_from auto --resume_from_iteration auto; "
            "to start over and move the existing artifacts aside, add --overwrite_output_dir."
            + (f" Rejected: {'; '.join(f'{r.path}: {r.reason}' for r in cands.rejected)}." if cands.rejected else "")
        )
    from dataclasses import replace

    return replace(plan, warnings=tuple(warnings) + plan.warnings, rejected=tuple(cands.rejected))


def _table(
    flags: RecoveryFlags,
    inv: Inventory,
    ckpt: TrainerCheckpoint | None,
    model: IterationModel | None,
    warnings: list[str],
) -> RecoveryPlan:
    """The decision table of SPEC §3, one branch per row."""
    base_init = flags.iteration_init == "base"

    # Row 1: none / none -> fresh.
    if ckpt is None and model is None:
        return RecoveryPlan(Mode.FRESH, 0, 0, BASE, None, StateScope.NONE,
                            "no checkpoint and no iteration model selected: training from scratch")

    # Row 2: checkpoint only -> full restore, continue its iteration at its step.
    if model is None:
        assert ckpt is not None
        done = _newest_model_iteration(inv)
        if ckpt.iteration <= done:
            raise RecoveryRefused(
                f"--resume_from {flags.resume_from}: {ckpt.path} belongs to iteration {ckpt.iteration}, which is "
                f"already committed (iter_{done} exists); continuing it without an iteration model would retrain "
                f"and replace committed work. Use --resume_from_iteration auto (or iter_{done}) with it, or "
                f"--resume_from auto --resume_from_iteration auto."
            )
        return RecoveryPlan(
            Mode.CHECKPOINT, ckpt.iteration, ckpt.step, ckpt.path, ckpt.path, StateScope.FULL,
            "trainer checkpoint only: full restore (weights, optimizer, scheduler, progress, RNG)",
            ckpt, None, supersedes=_superseded(inv, ckpt.iteration, ckpt.step, ckpt.path),
        )

    k = model.iteration
    weights = BASE if base_init else model.path
    init_note = " (--iteration_init base: each iteration starts from the base model)" if base_init else ""

    # Row 3: iteration model only -> its weights, fresh state, next iteration.
    if ckpt is None:
        ignored = [c.path for c in inv.checkpoints if c.status.usable and c.iteration == k + 1]
        if ignored and flags.resume_from == NONE:
            warnings.append(
                f"--resume_from none: ignoring {', '.join(ignored)} of iteration {k + 1}; those steps are redone"
            )
        return RecoveryPlan(
            Mode.ITERATION, k + 1, 0, weights, None, StateScope.NONE,
            f"iteration model only: weights from {model.path}{init_note}, training state starts fresh",
            None, model, supersedes=_superseded(inv, k + 1, -1, None),
        )

    # Row 4: the iteration model is newer (checkpoint from iteration <= K): weights from iter_K,
    # optimizer moments from the checkpoint, next iteration from step 0.
    if ckpt.iteration <= k:
        scope = StateScope.NONE if base_init else StateScope.OPTIMIZER
        state = None if base_init else ckpt.path
        reason = (
            f"Iteration models contain the latest trained weights: {ckpt.path} is from iteration "
            f"{ckpt.iteration}, {model.path} is newer; "
            + ("optimizer moments carry over, the schedule restarts for iteration " + str(k + 1)
               if not base_init else "training state starts fresh" + init_note)
        )
        return RecoveryPlan(Mode.BOTH, k + 1, 0, weights, state, scope, reason, ckpt, model,
                            supersedes=_superseded(inv, k + 1, -1, None))

    # The checkpoint is newer than anything the newest usable iteration model can continue into (the
    # model its iteration started from is damaged or gone): it holds the latest weights -> full restore.
    if ckpt.iteration > k + 1 and flags.resume_from_iteration == AUTO:
        return RecoveryPlan(
            Mode.CHECKPOINT, ckpt.iteration, ckpt.step, ckpt.path, ckpt.path, StateScope.FULL,
            f"{ckpt.path} holds the latest weights (step {ckpt.step} of iteration {ckpt.iteration}); the newest "
            f"usable iteration model, {model.path}, is older than the model that iteration started from",
            ckpt, None, supersedes=_superseded(inv, ckpt.iteration, ckpt.step, ckpt.path),
        )

    if ckpt.iteration == k + 1:
        # Row 5: the checkpoint is newer and a flag is auto -> weights and full state from it.
        if flags.any_auto:
            return RecoveryPlan(
                Mode.CHECKPOINT, k + 1, ckpt.step, ckpt.path, ckpt.path, StateScope.FULL,
                f"{ckpt.path} holds the latest weights: it is step {ckpt.step} of iteration {k + 1}, which "
                f"started from {model.path}; using {model.path}'s weights would throw away {ckpt.step} steps",
                ckpt, model, supersedes=_superseded(inv, k + 1, ckpt.step, ckpt.path),
            )
        # Row 6: both explicit (scenario 5) -> as written, with a warning.
        return RecoveryPlan(
            Mode.BOTH, k + 1, ckpt.step, model.path, ckpt.path, StateScope.FULL,
            f"as requested: weights from {model.path}, full training state from {ckpt.path} "
            f"(step {ckpt.step} of iteration {k + 1})",
            ckpt, model,
            warnings=(f"{ckpt.step} steps of weight updates in {ckpt.path} are discarded: the weights come from "
                      f"{model.path}; use --resume_from_iteration auto to keep them",),
            supersedes=_superseded(inv, k + 1, ckpt.step, ckpt.path),
            weights_override=True,
        )

    raise RecoveryRefused(
        f"{ckpt.path} belongs to iteration {ckpt.iteration} and cannot continue from {model.path} "
        f"(it would need iter_{ckpt.iteration - 1}). What exists: {inv.describe()}."
    )
