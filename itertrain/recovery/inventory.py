"""What discovery finds: one dataclass per artifact, their status, and the inventory of an output dir.

Plain data (no file access): `decide` reads it, `discover` and the artifact kinds (`kinds.py`) build it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Mapping


class Status(str, Enum):
    COMMITTED = "committed"  # manifest present (its files are checked when the artifact is chosen)
    STALE = "stale"  # committed checkpoint of an iteration whose model is committed
    TORN = "torn"  # no manifest inside an itertrain experiment: a crash mid-save
    CORRUPT = "corrupt"  # manifest unreadable or of the wrong kind
    UNVERIFIED = "unverified"  # written by another tool; structural check passed
    INVALID = "invalid"  # written by another tool; structural check failed

    @property
    def usable(self) -> bool:
        return self in (Status.COMMITTED, Status.STALE, Status.UNVERIFIED)


@dataclass(frozen=True)
class TrainerCheckpoint:
    """A `checkpoint-S` directory (top level, or kept inside `iter_K/`)."""

    path: str  # relative to the output dir
    step: int
    iteration: int  # from the manifest; inferred for foreign checkpoints
    status: Status
    mtime: float  # only read for foreign checkpoints (0.0 for committed ones: not needed)
    problem: str | None = None
    world_size: int | None = None
    foreign: bool = False
    symlink: bool = False  # listed and used read-only; never moved, deleted or written through


@dataclass(frozen=True)
class IterationModel:
    """An `iter_K` directory, or the guide's `base_model/` as iteration 0."""

    path: str
    iteration: int
    status: Status
    mtime: float
    problem: str | None = None
    missing_aux: tuple[str, ...] = ()  # config/tokenizer files to recreate from the base model
    foreign: bool = False
    symlink: bool = False


@dataclass(frozen=True)
class DataArtifact:
    """Generated data of one iteration, `data/iter_K/`; also the shape of any other kind's artifact
    (an artifact of iteration `iteration` at `path`)."""

    path: str
    iteration: int
    status: Status
    problem: str | None = None
    symlink: bool = False


GROUPS = ("iteration_models", "checkpoints", "data")  # the built-in kinds' fields of an Inventory


@dataclass(frozen=True)
class Inventory:
    output_dir: str
    is_experiment: bool
    checkpoints: tuple[TrainerCheckpoint, ...] = ()
    iteration_models: tuple[IterationModel, ...] = ()
    data: tuple[DataArtifact, ...] = ()
    others: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # kinds registered beyond these, by group

    def group(self, name: str) -> tuple[Any, ...]:
        """The artifacts of one kind's group (`ArtifactKind.group`): a field above, or one of `others`."""
        return getattr(self, name) if name in GROUPS else tuple(self.others.get(name, ()))

    @property
    def has_committed_progress(self) -> bool:
        """Anything but torn directories counts: committed work, work adopted from other tools, and
        damaged work that someone may still want to repair (never silently trained over)."""
        return any(a.status != Status.TORN for a in (*self.checkpoints, *self.iteration_models))

    @property
    def torn(self) -> list[str]:
        """Every manifest-less directory of an itertrain experiment: saves that never completed."""
        every = (*self.checkpoints, *self.iteration_models, *self.data, *(a for g in self.others.values() for a in g))
        return [a.path for a in every if a.status == Status.TORN]

    def describe(self) -> str:
        """A short listing of what exists, for error messages."""
        parts = []
        for m in sorted(self.iteration_models, key=lambda m: m.iteration):
            parts.append(f"{m.path} ({m.status.value}{', symlink' if m.symlink else ''})")
        for c in sorted(self.checkpoints, key=lambda c: (c.iteration, c.step)):
            parts.append(f"{c.path} (iteration {c.iteration}, step {c.step}, {c.status.value}"
                         f"{', symlink' if c.symlink else ''})")
        return ", ".join(parts) if parts else "no checkpoints and no iteration models"


def mark_stale(checkpoints: list[TrainerCheckpoint], models: list[IterationModel]) -> list[TrainerCheckpoint]:
    """Committed checkpoints of an iteration whose model is usable are stale (shown so; still usable:
    which artifact a launch uses is `decide.newest_usable`'s answer alone)."""
    done = max((m.iteration for m in models if m.status.usable), default=-1)
    out = []
    for c in checkpoints:
        if c.status in (Status.COMMITTED, Status.STALE):
            c = replace(c, status=Status.STALE if c.iteration <= done else Status.COMMITTED)
        out.append(c)
    return out


