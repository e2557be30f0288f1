"""Discovery: read an output directory into plain dataclasses (metadata only, no weights read).

The layout's scanner finds artifact directories by name; discovery classifies each one from its
manifest header (or, for directories written by other tools, a structural check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from itertrain.artifacts.manifest import ManifestError, ManifestHeader, read_header, read_manifest
from itertrain.layout import (
    ADAPTER_CONFIG_NAME,
    AUX_RE,
    BASE_MODEL_DIR,
    CONFIG_NAME,
    TRAINER_STATE_NAME,
    Kind,
    is_top_level,
    model_order,
    scan,
)
from itertrain.recovery.verify import structural_problems
from itertrain.weights import holds_adapter_only


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
    """Generated data of one iteration, `data/iter_K/`."""

    path: str
    iteration: int
    status: Status
    problem: str | None = None
    symlink: bool = False


@dataclass(frozen=True)
class Inventory:
    output_dir: str
    is_experiment: bool
    checkpoints: tuple[TrainerCheckpoint, ...] = ()
    iteration_models: tuple[IterationModel, ...] = ()
    data: tuple[DataArtifact, ...] = ()

    @property
    def has_committed_progress(self) -> bool:
        """Anything but torn directories counts: committed work, work adopted from other tools, and
        damaged work that someone may still want to repair (never silently trained over)."""
        return any(a.status != Status.TORN for a in (*self.checkpoints, *self.iteration_models))

    @property
    def torn(self) -> list[str]:
        return [a.path for a in (*self.checkpoints, *self.iteration_models, *self.data) if a.status == Status.TORN]

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


_NO_MANIFEST = "no manifest (the save never completed)"


def _header_status(directory: str, kind: Kind) -> tuple[Status, ManifestHeader | None, str | None]:
    """Status from the manifest's header only (no file list, no stat of every file: thousands of
    checkpoints are listed in milliseconds). Sizes and checksums are checked when an artifact is
    chosen (deep verification), where a damaged one is rejected and the next one tried."""
    try:
        header = read_header(directory)
    except ManifestError as e:
        return Status.CORRUPT, None, str(e)
    if header is None:
        return Status.TORN, None, _NO_MANIFEST
    if header.kind != kind.value:
        return Status.CORRUPT, header, f"manifest says kind {header.kind!r}, expected {kind.value!r}"
    return Status.COMMITTED, header, None


def missing_aux(root: str | Path, model: IterationModel) -> IterationModel:
    """`model` with `missing_aux` filled: the config/tokenizer files its manifest lists that are gone.

    Not part of discovery (that would read every model's full manifest); the recovery shell asks
    for the model it chose, `itertrain status` for every model it shows."""
    if model.foreign or model.status != Status.COMMITTED:
        return model
    directory = Path(root) / model.path
    try:
        manifest = read_manifest(directory)
    except ManifestError:
        return model
    if manifest is None:
        return model
    aux = tuple(rel for rel in manifest.files if AUX_RE.match(rel) and not os.path.exists(directory / rel))
    return replace(model, missing_aux=aux)


def _foreign_status(directory: Path, kind: Kind) -> tuple[Status, str | None]:
    problems = structural_problems(directory, kind.value)
    return (Status.INVALID, "; ".join(problems)) if problems else (Status.UNVERIFIED, None)


def _foreign_step(directory: Path, fallback: int) -> int:
    try:
        return int(json.loads((directory / TRAINER_STATE_NAME).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def discover(output_dir: str | Path, record: dict | None = None) -> Inventory:
    """Every checkpoint, iteration model and data artifact under `output_dir`, classified.

    `record` is the parsed itertrain.json (read with `experiment.load_record` when not given, which
    refuses a corrupt one). Inside an itertrain experiment a manifest-less directory is torn, unless
    the record lists it as adopted from another tool; outside one, such directories are foreign and
    get a structural check.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return Inventory(str(root), False)
    if record is None:
        from itertrain.experiment import load_record

        record = load_record(root)
    is_experiment = bool(record)
    adopted = set(record.get("adopted", [])) if record else set()
    entries = scan(root)

    models: list[IterationModel] = []
    for e in (e for e in entries if e.kind == Kind.ITERATION_MODEL):
        directory = root / e.rel
        status, header, problem = _header_status(str(directory), Kind.ITERATION_MODEL)
        foreign = False
        aux: tuple[str, ...] = ()
        if status == Status.TORN and (not is_experiment or e.rel in adopted or e.rel == BASE_MODEL_DIR):
            status, problem = _foreign_status(directory, Kind.ITERATION_MODEL)
            foreign = True
            config = ADAPTER_CONFIG_NAME if holds_adapter_only(directory) else CONFIG_NAME  # a LoRA adapter dir
            if not (directory / config).exists() and status == Status.UNVERIFIED:
                aux = (config,)
        elif header is not None and header.iteration != e.number:
            status, problem = Status.CORRUPT, f"manifest says iteration {header.iteration}, the name says {e.number}"
        models.append(IterationModel(e.rel, e.number, status, _mtime(directory), problem, aux, foreign, e.symlink))

    # Checkpoints kept inside an iteration model are listed when that model is one of ours.
    ours = {m.path for m in models if m.status.usable and not m.foreign}
    scanned: list[TrainerCheckpoint] = []
    for e in (e for e in entries if e.kind == Kind.TRAINER_CHECKPOINT):
        if not is_top_level(e.rel) and e.rel.split("/", 1)[0] not in ours:
            continue
        directory = root / e.rel
        status, header, problem = _header_status(str(directory), Kind.TRAINER_CHECKPOINT)
        if status == Status.TORN and is_top_level(e.rel) and (not is_experiment or e.rel in adopted):
            # Only foreign checkpoints are ordered by modification time: stat just those.
            status, problem = _foreign_status(directory, Kind.TRAINER_CHECKPOINT)
            scanned.append(TrainerCheckpoint(e.rel, _foreign_step(directory, e.number), -1, status,
                                             _mtime(directory), problem, None, True, e.symlink))
        else:
            scanned.append(TrainerCheckpoint(e.rel, e.number, header.iteration if header else -1, status, 0.0,
                                             problem, header.world_size if header else None, False, e.symlink))

    newest_model = max((m for m in models if m.status.usable), key=model_order, default=None)
    checkpoints = [_with_inferred_iteration(c, newest_model) if c.foreign and c.status.usable else c for c in scanned]

    data = []
    for e in (e for e in entries if e.kind == Kind.DATA):
        status, _, problem = _header_status(str(root / e.rel), Kind.DATA)
        data.append(DataArtifact(e.rel, e.number, status, problem, e.symlink))

    return Inventory(
        str(root),
        is_experiment,
        tuple(sorted(mark_stale(checkpoints, models), key=lambda c: (c.iteration, c.step, c.path))),
        tuple(sorted(models, key=lambda m: (m.iteration, m.path))),
        tuple(sorted(data, key=lambda d: d.iteration)),
    )


def _with_inferred_iteration(ckpt: TrainerCheckpoint, newest_model: IterationModel | None) -> TrainerCheckpoint:
    """A foreign checkpoint has no iteration: it belongs to the iteration after the newest model
    unless that model is newer on disk (then the checkpoint is from the model's iteration)."""
    if newest_model is None:
        return replace(ckpt, iteration=0)
    if newest_model.mtime >= ckpt.mtime:
        return replace(ckpt, iteration=newest_model.iteration)
    return replace(ckpt, iteration=newest_model.iteration + 1)
