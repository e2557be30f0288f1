"""The recovery decision: a pure function from (flags, inventory) to a RecoveryPlan.

No torch, no file access: everything it needs is in `RecoveryFlags` and the `Inventory`. The four
rules, in order:

1. an explicit value (`S`, `iter_K`) is obeyed as written;
2. otherwise the weights come from whichever artifact is newer (iteration model vs checkpoint);
3. training state applies in full within the iteration it belongs to; across an iteration
   boundary only the optimizer moments carry over;
4. `auto` only considers candidates consistent with an explicit value on the other flag.

`newest_usable` is the one place that says which artifacts are newest and usable (`skip_reason` its
one usability rule). `decide` is called again with `rejected` growing when verification or loading
of a chosen artifact fails (auto only), and asks `newest_usable` again itself when the plan cannot
serve the chosen checkpoint: that is the fallback to the next older candidate. A rejected iteration
model no longer counts as done: the checkpoints of its iteration may rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from itertrain.errors import RecoveryRefused
from itertrain.layout import checkpoint_order, is_top_level, model_order
from itertrain.recovery import kinds
from itertrain.recovery.discover import Inventory, IterationModel, TrainerCheckpoint
from itertrain.recovery.flags import AUTO, BASE, NONE, RecoveryFlags
from itertrain.recovery.plan import Mode, Rejection, RecoveryPlan


_CHOSEN = ("iteration_models", "checkpoints")  # the kinds the plan chooses among: their rules are its own


@dataclass
class Pick:
    """`newest_usable`'s answer: the checkpoint and the iteration model a launch continues from (None:
    none), the usable candidates they were chosen among, and every artifact skipped with why."""

    checkpoint: TrainerCheckpoint | None = None
    model: IterationModel | None = None
    checkpoints: list[TrainerCheckpoint] = field(default_factory=list)
    models: list[IterationModel] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def skip_reason(artifact: TrainerCheckpoint | IterationModel, rejected: Mapping[str, str]) -> str | None:
    """Why `artifact` cannot be continued from, None when it can: the one usability rule. A later check
    that failed (deep verification, loading on a rank, a plan that cannot serve it) says so in `rejected`;
    otherwise its discovered status decides (a stale mark is only shown: stale ones are usable)."""
    if artifact.path in rejected:
        return rejected[artifact.path]
    return None if artifact.status.usable else f"{artifact.status.value}: {artifact.problem}"


def _candidates(inv: Inventory, rejected: Mapping[str, str]) -> Pick:
    c = Pick()
    for artifact in (*inv.iteration_models, *inv.checkpoints):
        why = skip_reason(artifact, rejected)
        if why is not None:
            c.rejected.append(Rejection(artifact.path, why))
        elif isinstance(artifact, IterationModel):
            c.models.append(artifact)
        else:
            c.checkpoints.append(artifact)
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
    model = max(found, key=model_order)
    if model.path in rejected:
        raise _refuse_explicit("--resume_from_iteration", value, f"{model.path} failed: {rejected[model.path]}", inv)
    if not model.status.usable:
        raise _refuse_explicit(
            "--resume_from_iteration", value, f"{model.path} is {model.status.value} ({model.problem})", inv
        )
    return model


def _explicit_checkpoint(value: str, inv: Inventory, rejected: Mapping[str, str],
                         model: IterationModel | None) -> TrainerCheckpoint:
    step = int(value)
    found = [c for c in inv.checkpoints if c.step == step]
    if not found:
        raise _refuse_explicit("--resume_from", value, f"checkpoint-{step} does not exist", inv)
    if model is not None:
        found = [c for c in found if c.iteration <= model.iteration + 1] or found
    usable = [c for c in found if c.status.usable and c.path not in rejected]
    if not usable:
        c = found[0]
        why = rejected.get(c.path) or f"{c.status.value} ({c.problem})"
        raise _refuse_explicit("--resume_from", value, f"{c.path} cannot be used: {why}", inv)
    return max(usable, key=checkpoint_order)


def _done(cands: Pick) -> int:
    """The newest iteration with a usable (not rejected) model; -1 when none."""
    return max((m.iteration for m in cands.models), default=-1)


def _model_of(cands: Pick, iteration: int) -> str | None:
    found = [m for m in cands.models if m.iteration == iteration]
    return max(found, key=model_order).path if found else None


def _superseded(inv: Inventory, cands: Pick, iteration: int, step: int, keep: str | None) -> tuple[str, ...]:
    """Committed work this run replaces, moved aside before it starts (never overwritten): the
    iteration models of `iteration` and later (the guide's "continue from a given iteration"), what
    every other kind says a restart of `iteration` replaces (`ArtifactKind.superseded`: the data of
    later iterations, ...), and top-level checkpoints of this iteration past `step` or of later ones."""
    models = [m.path for m in cands.models if m.iteration >= iteration and not m.foreign]
    others = [a.path for kind in kinds.registered() if kind.group not in _CHOSEN
              for a in inv.group(kind.group) if kind.superseded(a, iteration, step)]
    ckpts = [c.path for c in inv.checkpoints
             if is_top_level(c.path) and c.path != keep and c.status.usable
             and (c.iteration > iteration or (c.iteration == iteration and c.step > step))]
    return tuple(models + others + ckpts)


def decide(flags: RecoveryFlags, inv: Inventory, rejected: Mapping[str, str] | None = None) -> RecoveryPlan:
    """The recovery plan for these flags and this inventory. Raises RecoveryRefused.

    A plan that cannot serve the checkpoint `newest_usable` picked rejects it, and the pick is asked
    again (auto) or the launch refused (explicit): the same path as a failed verification or load."""
    rejected = dict(rejected or {})
    while True:
        plan, why = _served(_decide(flags, inv, rejected), flags)
        if why is None:
            return plan
        if flags.resume_from != AUTO:
            raise _refuse_explicit("--resume_from", flags.resume_from, f"{plan.state_from} is {why}", inv)
        rejected[plan.state_from] = why  # type: ignore[index]


def _served(plan: RecoveryPlan, flags: RecoveryFlags) -> tuple[RecoveryPlan, str | None]:
    """The plan completed with its LoRA halves, or why it cannot use its checkpoint: one kept inside an
    iteration model this run replaces cannot be read once that model moved aside; a merged LoRA adapter
    needs the model it was trained on."""
    inside = next((p for p in plan.supersedes if plan.state_from and plan.state_from.startswith(p + "/")), None)
    if inside:
        return plan, f"kept inside {inside}, which this run replaces"
    return with_lora(plan, flags)


def with_lora(plan: RecoveryPlan, flags: RecoveryFlags) -> tuple[RecoveryPlan, str | None]:
    """The plan's LoRA halves (`adapter_base`, `adapter_from`), or why its checkpoint cannot be used.

    merged: iteration K's adapter applies to the model it started from (iter_{K-1}, or the base model
    for K = 0 and under --iteration_init base); it is fresh unless a checkpoint of K is restored.
    adapter: one adapter on the base model across iterations: from the checkpoint restored, from the
    iteration model the iteration starts from (--iteration_init previous), or fresh."""
    if flags.lora is None or plan.mode == Mode.COMPLETE:
        return plan, None
    k, base_init = plan.iteration, flags.iteration_init == "base"
    restored = plan.state_from if plan.mode == Mode.CHECKPOINT else None
    if flags.lora == "adapter":
        start = None if base_init or plan.iteration_model is None or plan.mode == Mode.CHECKPOINT \
            else plan.iteration_model.path
        return plan.with_(lora=flags.lora, adapter_base=BASE, adapter_from=restored or start), None
    applies_to = BASE if k == 0 or base_init else plan.previous_model
    if applies_to is None:
        return plan, (f"a LoRA adapter trained on iter_{k - 1} (--iteration_model merged), and no usable iter_{k - 1} "
                      "exists to apply it to")
    return plan.with_(lora=flags.lora, adapter_base=applies_to, adapter_from=restored), None


def newest_usable(flags: RecoveryFlags, inv: Inventory, rejected: Mapping[str, str]) -> Pick:
    """Which trainer checkpoint and which iteration model this launch continues from: the one answer to
    "which artifact is newest and usable", with every artifact skipped and why. Usable: `skip_reason`
    finds nothing against it (its status allows it: committed, stale, or adopted from another tool and
    structurally sound; nothing rejected it); newest: the layout's one ordering (`checkpoint_order`,
    `model_order`). Rules 1 and 4 of the module docstring apply here. Everything that finds an artifact
    unusable later (deep verification, loading on every rank, a plan it cannot serve) adds it to
    `rejected` and asks again: that is the whole fallback."""
    pick = _candidates(inv, rejected)
    rf, ri = flags.resume_from, flags.resume_from_iteration

    # Rule 1: explicit values are obeyed as written (errors if missing, torn or failed).
    model = _explicit_model(ri, inv, rejected) if ri not in (AUTO, NONE) else None
    ckpt = _explicit_checkpoint(rf, inv, rejected, model) if rf not in (AUTO, NONE) else None

    # Rule 4: auto only considers candidates consistent with an explicit value on the other flag.
    if ri == AUTO:
        models = pick.models
        if ckpt is not None:
            models = [m for m in models if m.iteration >= ckpt.iteration - 1]
        model = max(models, key=model_order, default=None)
    if rf == AUTO:
        ckpts = pick.checkpoints
        if model is not None and ri != AUTO:
            ckpts = [c for c in ckpts if c.iteration <= model.iteration + 1]
        if ri == NONE:
            # Without an iteration model, a checkpoint of an already committed iteration cannot be
            # continued without retraining (and replacing) that iteration's model.
            ckpts = [c for c in ckpts if c.iteration > _done(pick)]
        ckpt = max(ckpts, key=checkpoint_order, default=None)
    pick.checkpoint, pick.model = ckpt, model
    return pick


def _decide(flags: RecoveryFlags, inv: Inventory, rejected: dict[str, str]) -> RecoveryPlan:
    cands = newest_usable(flags, inv, rejected)
    ckpt, model = cands.checkpoint, cands.model
    plan = _table(flags, inv, cands, ckpt, model)
    if plan.mode != Mode.COMPLETE and plan.iteration >= flags.num_iterations:
        plan = RecoveryPlan.complete(plan.iteration, flags.num_iterations, weights_from=plan.weights_from,
                                     ckpt=ckpt, model=model)
    if plan.mode == Mode.FRESH and inv.has_committed_progress and not flags.overwrite_output_dir:
        already_auto = flags.resume_from == AUTO and flags.resume_from_iteration == AUTO
        advice = ("every candidate to continue from was rejected (below): put the damaged files back (a copy, a "
                  "backup), or start over" if already_auto else
                  "To continue it, run with --resume_from auto --resume_from_iteration auto; to start over")
        raise RecoveryRefused(
            f"refusing to start from scratch: {inv.output_dir} holds committed progress "
            f"({inv.describe()}). {advice} and move the existing artifacts aside: add --overwrite_output_dir."
            + (f" Rejected: {'; '.join(f'{r.path}: {r.reason}' for r in cands.rejected)}." if cands.rejected else "")
        )
    later = [p for p in plan.supersedes if not p.startswith("checkpoint-")]
    warnings = (f"this run replaces later work: {', '.join(later)} move to superseded/ before training",) if later else ()
    return plan.with_(warnings=plan.warnings + warnings, rejected=tuple(cands.rejected))


def _table(flags: RecoveryFlags, inv: Inventory, cands: Pick, ckpt: TrainerCheckpoint | None,
           model: IterationModel | None) -> RecoveryPlan:
    """The decision table, one branch per row."""
    base_init = flags.iteration_init == "base"

    # Row 1: none / none -> fresh.
    if ckpt is None and model is None:
        return RecoveryPlan.fresh()

    # Row 2: checkpoint only -> full restore, continue its iteration at its step.
    if model is None:
        assert ckpt is not None
        done = _done(cands)
        if ckpt.iteration <= done:
            raise RecoveryRefused(
                f"--resume_from {flags.resume_from}: {ckpt.path} belongs to iteration {ckpt.iteration}, which is "
                f"already committed (iter_{done} exists); continuing it without an iteration model would retrain "
                f"and replace committed work. Use --resume_from_iteration auto (or iter_{done}) with it, or "
                f"--resume_from auto --resume_from_iteration auto."
            )
        return RecoveryPlan.restore(
            ckpt, reason="trainer checkpoint only: full restore (weights, optimizer, scheduler, progress, RNG)",
            previous_model=_model_of(cands, ckpt.iteration - 1),
            supersedes=_superseded(inv, cands, ckpt.iteration, ckpt.step, ckpt.path),
        )

    k = model.iteration
    weights = BASE if base_init else model.path
    init_note = (f"weights from the base model (--iteration_init base); {model.path} marks iteration {k} as done"
                 if base_init else f"weights from {model.path}")

    # Row 3: iteration model only -> its weights, fresh state, next iteration.
    if ckpt is None:
        ignored = [c.path for c in cands.checkpoints if c.iteration == k + 1]
        warnings = ((f"--resume_from none: ignoring {', '.join(ignored)} of iteration {k + 1}; those steps are "
                     "redone",) if ignored and flags.resume_from == NONE else ())
        return RecoveryPlan.next_iteration(
            model, weights=weights, reason=f"iteration model only: {init_note}, training state starts fresh",
            warnings=warnings, supersedes=_superseded(inv, cands, k + 1, -1, None),
        )

    return _both(flags, inv, cands, ckpt, model, weights, init_note)


def _both(flags: RecoveryFlags, inv: Inventory, cands: Pick, ckpt: TrainerCheckpoint, model: IterationModel,
          weights: str, init_note: str) -> RecoveryPlan:
    """The decision table's rows with both a checkpoint and an iteration model (rows 4 to 6)."""
    k, base_init = model.iteration, flags.iteration_init == "base"

    # Row 4: the iteration model is newer (checkpoint from iteration <= K): weights from iter_K,
    # optimizer moments from the checkpoint, next iteration from step 0. Under --iteration_init base
    # nothing comes from the checkpoint: the iteration starts from the base model with a fresh state.
    if ckpt.iteration <= k:
        if base_init or flags.lora == "merged":
            # --iteration_model merged: iteration K+1 trains a fresh LoRA adapter on iter_K, and the
            # moments of iteration K's adapter belong to another adapter (same shapes, other parameters).
            fresh = (f"{init_note}; training state starts fresh" if base_init else
                     f"weights from {model.path} (LoRA adapter merged in); iteration {k + 1} trains a fresh adapter "
                     "on it, so its optimizer moments start fresh")
            return RecoveryPlan.next_iteration(
                model, weights=weights, ckpt=ckpt, supersedes=_superseded(inv, cands, k + 1, -1, None),
                reason=f"{fresh} ({ckpt.path} is not used)",
            )
        return RecoveryPlan.next_iteration(
            model, weights=weights, moments_from=ckpt, supersedes=_superseded(inv, cands, k + 1, -1, None),
            reason=f"Iteration models contain the latest trained weights: {ckpt.path} is from iteration "
                   f"{ckpt.iteration}, {model.path} is newer; optimizer moments carry over, the schedule restarts "
                   f"for iteration {k + 1}",
        )

    # The checkpoint is newer than anything the newest usable iteration model can continue into (the
    # model its iteration started from is damaged or gone): it holds the latest weights -> full restore.
    if ckpt.iteration > k + 1 and flags.resume_from_iteration == AUTO:
        return RecoveryPlan.restore(
            ckpt, previous_model=_model_of(cands, ckpt.iteration - 1),
            reason=f"{ckpt.path} holds the latest weights (step {ckpt.step} of iteration {ckpt.iteration}); the "
                   f"newest usable iteration model, {model.path}, is older than the model that iteration started from",
            supersedes=_superseded(inv, cands, ckpt.iteration, ckpt.step, ckpt.path),
        )

    if ckpt.iteration == k + 1:
        supersedes = _superseded(inv, cands, k + 1, ckpt.step, ckpt.path)
        # Row 5: the checkpoint is newer and a flag is auto -> weights and full state from it.
        if flags.any_auto:
            return RecoveryPlan.restore(
                ckpt, model=model, previous_model=model.path, supersedes=supersedes,
                reason=f"{ckpt.path} holds the latest weights: it is step {ckpt.step} of iteration {k + 1}, which "
                       f"started from {model.path}; using {model.path}'s weights would throw away {ckpt.step} steps",
            )
        # Row 6: both explicit (scenario 5) -> as written, with a warning.
        return RecoveryPlan.override(
            model, ckpt, supersedes=supersedes,
            reason=f"as requested: weights from {model.path}, full training state from {ckpt.path} "
                   f"(step {ckpt.step} of iteration {k + 1})",
            warnings=(f"{ckpt.step} steps of weight updates in {ckpt.path} are discarded: the weights come from "
                      f"{model.path}; use --resume_from_iteration auto to keep them",),
        )

    raise RecoveryRefused(
        f"{ckpt.path} belongs to iteration {ckpt.iteration} and cannot continue from {model.path} "
        f"(it would need iter_{ckpt.iteration - 1}). What exists: {inv.describe()}."
    )

