"""Retention: which trainer checkpoints to keep, move into an iteration model, or delete. Pure.

`plan_retention` is a function from (the committed checkpoints on disk, what just happened, the
policy) to a list of actions; `CheckpointManager` applies them. Rules:
- rotation (`--save_total_limit`) runs only after a new checkpoint committed, only within the
  iteration in progress, and never removes the newest checkpoint or the best one;
- when iteration K's model commits, its checkpoints go, except the newest while iteration K+1 needs
  its optimizer moments (the *carry*, moved into `iter_K/`); with --keep_iteration_checkpoints all
  move in;
- once iteration J has a committed checkpoint of its own, the checkpoints of older iterations are
  retired, and carries inside older iteration models are deleted; checkpoints the user kept (moved
  in under --keep_iteration_checkpoints) are never deleted, whatever the flag says now;
- a checkpoint is retired only when the iteration model it backs is usable (`backed`): otherwise it
  may be the only way to rebuild that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from itertrain.layout import checkpoint_order, is_top_level, iteration_name


@dataclass(frozen=True)
class ListedCheckpoint:
    """A committed trainer checkpoint as retention sees it."""

    path: str  # relative to the output dir; "iter_K/checkpoint-S" when kept inside an iteration model
    iteration: int
    step: int
    kept_by_user: bool = False  # inside iter_K/ because --keep_iteration_checkpoints was on
    foreign: bool = False
    mtime: float = 0.0


@dataclass(frozen=True)
class RetentionPolicy:
    save_total_limit: int | None = None
    keep_iteration_checkpoints: bool = False
    carry_optimizer: bool = True  # keep iteration K's newest checkpoint until K+1 has its own


class Op(str, Enum):
    DELETE = "delete"
    MOVE = "move"


@dataclass(frozen=True)
class Action:
    op: Op
    path: str
    dest: str | None = None
    reason: str = ""


class Event(str, Enum):
    CHECKPOINT_COMMITTED = "checkpoint_committed"  # a checkpoint of `iteration` just committed
    ITERATION_COMMITTED = "iteration_committed"  # iter_{iteration} just committed
    PLAN_MADE = "plan_made"  # a launch's plan is final: finish a retirement a crash interrupted


def _into_model(c: ListedCheckpoint) -> str:
    return f"{iteration_name(c.iteration)}/{c.path}"


def plan_retention(
    listing: list[ListedCheckpoint],
    *,
    event: Event,
    iteration: int,
    policy: RetentionPolicy,
    backed: frozenset[int] | set[int],
    models: frozenset[int] | set[int] | None = None,
    protect: frozenset[str] | set[str] = frozenset(),
    last: bool = False,
) -> list[Action]:
    """The actions for `event`. `backed`: iterations whose model is usable (their checkpoints may be
    retired); `models`: iterations whose model directory exists (a checkpoint can move into it;
    default `backed`); `protect`: paths never touched (the new checkpoint, the best one, the plan's)."""
    models = set(backed) if models is None else set(models)
    keep = policy.keep_iteration_checkpoints
    top = [c for c in listing if is_top_level(c.path) and c.path not in protect]
    taken = {c.path for c in listing}
    actions: list[Action] = []

    def retire(c: ListedCheckpoint, keep_it: bool, why: str) -> None:
        dest = _into_model(c)
        if keep_it and c.iteration in models and dest not in taken:
            taken.add(dest)
            actions.append(Action(Op.MOVE, c.path, dest, why))
        else:
            actions.append(Action(Op.DELETE, c.path, None, why))

    def drop_carries(below: int) -> None:
        for c in listing:
            if (not is_top_level(c.path) and c.iteration < below and not c.kept_by_user
                    and c.path not in protect and c.iteration in backed):
                actions.append(Action(Op.DELETE, c.path, None, f"optimizer moments of iteration {c.iteration} "
                                                             "are no longer needed"))

    if event == Event.CHECKPOINT_COMMITTED:
        limit = policy.save_total_limit
        mine = sorted((c for c in listing if is_top_level(c.path) and c.iteration == iteration), key=checkpoint_order)
        if limit and limit > 0 and len(mine) > limit:
            for c in mine[:-limit]:
                if c.path not in protect and c is not mine[-1]:
                    actions.append(Action(Op.DELETE, c.path, None, f"--save_total_limit {limit}"))
        for c in top:
            if c.iteration < iteration and c.iteration in backed:
                retire(c, keep, f"iteration {iteration} has a checkpoint of its own")
        if not keep:
            drop_carries(below=iteration)
        return actions

    if event == Event.ITERATION_COMMITTED:
        mine = sorted((c for c in top if c.iteration <= iteration), key=checkpoint_order)
        carry = mine[-1] if mine and policy.carry_optimizer and not last else None
        for c in mine:
            if c.iteration in backed:
                retire(c, keep or c is carry, f"{iteration_name(iteration)} is committed"
                       + (" (newest kept: its optimizer moments seed the next iteration)" if c is carry else ""))
        if last and not keep:
            drop_carries(below=iteration + 1)
        return actions

    # PLAN_MADE: stale top-level checkpoints left by a crash between an iteration commit and its clean-up.
    for c in top:
        if c.iteration in backed and c.iteration < iteration:
            retire(c, keep, "left by an interrupted iteration commit")
    return actions
