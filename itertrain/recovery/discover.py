"""Discovery: read an output directory into plain dataclasses (metadata only, no weights read)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from itertrain.recovery.manifest import (
    DATA,
    ITERATION_MODEL,
    TRAINER_CHECKPOINT,
    ManifestError,
    ManifestHeader,
    read_header,
    read_manifest,
)
from itertrain.recovery.verify import TRAINER_STATE, structural_problems

CHECKPOINT_RE = re.compile(r"^checkpoint-([0-9]+)$")
ITERATION_RE = re.compile(r"^iter_([0-9]+)$")
BASE_MODEL_DIR = "base_model"  # the guide's layout: the model of iteration 0
EXPERIMENT_RECORD = "itertrain.json"

# Files of an iteration model that can be recreated from the base model when missing (SPEC §3).
_AUX_RE = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|vocab\..*|merges\.txt|chat_template.*)$"
)


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


@dataclass(frozen=True)
class DataArtifact:
    """Generated data of one iteration, `data/iter_K/`."""

    path: str
    iteration: int
    status: Status
    problem: str | None = None


@dataclass(frozen=True)
class Inventory:
    output_dir: str
    is_experiment: bool
    checkpoints: tuple[TrainerCheckpoint, ...] = ()
    iteration_models: tuple[IterationModel, ...] = ()
    data: tuple[DataArtifact, ...] = ()
    record: dict = field(default_factory=dict, compare=False)

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
            parts.append(f"{m.path} ({m.status.value})")
        for c in sorted(self.checkpoints, key=lambda c: (c.iteration, c.step)):
            parts.append(f"{c.path} (iteration {c.iteration}, step {c.step}, {c.status.value})")
        return ", ".join(parts) if parts else "no checkpoints and no iteration models"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


_NO_MANIFEST = "no manifest (the save never completed)"


def _header_status(directory: str, kind: str) -> tuple[Status, ManifestHeader | None, str | None]:
    """Status from the manifest's header only (no file list, no stat of every file: thousands of
    checkpoints are listed in milliseconds). Sizes and checksums are checked when an artifact is
    chosen (deep verification), where a damaged one is rejected and the next one tried."""
    try:
        header = read_header(directory)
    except ManifestError as e:
        return Status.CORRUPT, None, str(e)
    if header is None:
        return Status.TORN, None, _NO_MANIFEST
    if header.kind != kind:
        return Status.CORRUPT, header, f"manifest says kind {header.kind!r}, expected {kind!r}"
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
    aux = tuple(rel for rel in manifest.files if _AUX_RE.match(rel) and not os.path.exists(directory / rel))
    return replace(model, missing_aux=aux)


def _foreign_status(directory: Path, kind: str) -> tuple[Status, str | None]:
    problems = structural_problems(directory, kind)
    return (Status.INVALID, "; ".join(problems)) if problems else (Status.UNVERIFIED, None)


def _foreign_step(directory: Path, fallback: int) -> int:
    try:
        return int(json.loads((directory / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def _scan_checkpoints(root: str, base: str, treat_as_foreign: bool, adopted: set[str]) -> list[TrainerCheckpoint]:
    out = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return out
    prefix = "" if base == root else os.path.relpath(base, root) + "/"
    for entry in entries:
        m = CHECKPOINT_RE.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        rel = prefix + entry.name
        step = int(m.group(1))
        status, header, problem = _header_status(entry.path, TRAINER_CHECKPOINT)
        if status == Status.TORN and (treat_as_foreign or rel in adopted):
            # Only foreign checkpoints are ordered by modification time: stat just those.
            directory = Path(entry.path)
            mtime = entry.stat(follow_symlinks=False).st_mtime
            status, problem = _foreign_status(directory, TRAINER_CHECKPOINT)
            step = _foreign_step(directory, step)
            out.append(TrainerCheckpoint(rel, step, -1, status, mtime, problem, None, foreign=True))
        else:
            iteration = header.iteration if header else -1
            ws = header.world_size if header else None
            out.append(TrainerCheckpoint(rel, step, iteration, status, 0.0, problem, ws))
    return out


def discover(output_dir: str | Path, record: dict | None = None) -> Inventory:
    """Every checkpoint, iteration model and data artifact under `output_dir`, classified.

    `record` is the parsed itertrain.json (read here when not given). Inside an itertrain
    experiment a manifest-less directory is torn, unless the record lists it as adopted from
    another tool; outside one, such directories are foreign and get a structural check.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return Inventory(str(root), False)
    if record is None:
        record = read_record(root)
    is_experiment = bool(record)
    adopted = set(record.get("adopted", [])) if record else set()
    foreign_everywhere = not is_experiment

    models: list[IterationModel] = []
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False):
            continue
        m = ITERATION_RE.match(entry.name)
        if m is None and entry.name != BASE_MODEL_DIR:
            continue
        directory = Path(entry.path)
        iteration = int(m.group(1)) if m else 0
        status, header, problem = _header_status(entry.path, ITERATION_MODEL)
        foreign = False
        aux: tuple[str, ...] = ()
        if status == Status.TORN and (foreign_everywhere or entry.name in adopted or m is None):
            status, problem = _foreign_status(directory, ITERATION_MODEL)
            foreign = True
            if not (directory / "config.json").exists() and status == Status.UNVERIFIED:
                aux = ("config.json",)
        elif header is not None and header.iteration != iteration:
            status, problem = Status.CORRUPT, f"manifest says iteration {header.iteration}, the name says {iteration}"
        models.append(IterationModel(entry.name, iteration, status, _mtime(directory), problem, aux, foreign))

    scanned = _scan_checkpoints(str(root), str(root), foreign_everywhere, adopted)
    for model in models:
        if model.status.usable and not model.foreign:
            scanned += _scan_checkpoints(str(root), str(root / model.path), False, set())

    newest_model = max((m for m in models if m.status.usable), key=lambda m: m.iteration, default=None)
    checkpoints = []
    for ckpt in scanned:
        if ckpt.foreign and ckpt.status.usable:
            ckpt = _with_inferred_iteration(ckpt, newest_model)
        if ckpt.status == Status.COMMITTED and newest_model is not None and ckpt.iteration <= newest_model.iteration:
            ckpt = _replace(ckpt, status=Status.STALE)
        checkpoints.append(ckpt)

    data = []
    data_root = root / "data"
    if data_root.is_dir():
        for entry in os.scandir(data_root):
            m = ITERATION_RE.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            status, _, problem = _header_status(entry.path, DATA)
            data.append(DataArtifact(f"data/{entry.name}", int(m.group(1)), status, problem))

    return Inventory(
        str(root),
        is_experiment,
        tuple(sorted(checkpoints, key=lambda c: (c.iteration, c.step, c.path))),
        tuple(sorted(models, key=lambda m: (m.iteration, m.path))),
        tuple(sorted(data, key=lambda d: d.iteration)),
        record or {},
    )


def _replace(ckpt: TrainerCheckpoint, **changes) -> TrainerCheckpoint:
    return replace(ckpt, **changes)


def _with_inferred_iteration(ckpt: TrainerCheckpoint, newest_model: IterationModel | None) -> TrainerCheckpoint:
    """A foreign checkpoint has no iteration: it belongs to the iteration after the newest model
    unless that model is newer on disk (then the checkpoint is from the model's iteration)."""
    if newest_model is None:
        return _replace(ckpt, iteration=0)
    if newest_model.mtime >= ckpt.mtime:
        return _replace(ckpt, iteration=newest_model.iteration, status=Status.UNVERIFIED)
    return _replace(ckpt, iteration=newest_model.iteration + 1)


def read_record(root: Path) -> dict:
    """The parsed itertrain.json, {} when absent or unreadable."""
    try:
        return json.loads((Path(root) / EXPERIMENT_RECORD).read_text())
    except (OSError, ValueError):
        return {}
