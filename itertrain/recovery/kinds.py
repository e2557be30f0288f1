"""Artifact kinds: one class per kind of artifact directory, and the registry the rest iterates over.

A kind says where its directories are (`entries`: its scan pattern), what one found directory is
(`classify`: from its manifest header, or a structural `check` for one another tool wrote), what a
restart replaces (`superseded`), how it is committed (`commit`, inherited from the artifacts floor's
`CommitKind`, which `CheckpointManager` commits through: the commit worker owns the invariants -
files fsynced, manifest written to a temporary name, fsynced, renamed last) and how it is shown
(`describe`: its status line). Discovery, `itertrain status`, `itertrain verify`, resolve's deep
verification, the plan's superseded list, `--overwrite_output_dir` and the reports iterate over
`registered()`; a new kind is one subclass and one `register` call. The `name` is the `kind` string
written into manifests: on disk forever, never renamed.

The layout's scanner knows only the built-in names (`iter_K`, `checkpoint-S`, `data/iter_K`): a new
kind overrides `entries` (its scan pattern). Its directories without a manifest are torn, as data's
are (removed by the next launch), never adopted as another tool's work: whoever registers a kind
owns its names (override `classify` to adopt such directories instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from itertrain.artifacts.kind import CommitKind, DataCommit, IterationModelCommit, TrainerCheckpointCommit
from itertrain.artifacts.manifest import (
    Manifest,
    ManifestError,
    ManifestHeader,
    allow_kind,
    read_header,
    read_manifest,
    verify_checksums,
)
from itertrain.layout import (
    ADAPTER_CONFIG_NAME,
    BASE_MODEL_DIR,
    CONFIG_NAME,
    TRAINER_STATE_NAME,
    Entry,
    is_top_level,
    model_order,
)
from itertrain.recovery.inventory import DataArtifact, IterationModel, Status, TrainerCheckpoint, mark_stale
from itertrain.recovery.verify import structural_problems
from itertrain.weights import holds_adapter_only

NO_MANIFEST = "no manifest (the save never completed)"


@dataclass
class Scan:
    """What discovery knows while it classifies: the experiment, what the one scan found by name, and
    what the kinds before this one found (by group): checkpoints are listed after models, for instance."""

    root: Path
    is_experiment: bool
    adopted: frozenset[str]
    entries: list[Entry]
    found: dict[str, list[Any]] = field(default_factory=dict)

    def manifestless_is_foreign(self, rel: str) -> bool:
        """A directory without a manifest was written by another tool (not torn): outside an itertrain
        experiment, or listed as adopted in its record."""
        return not self.is_experiment or rel in self.adopted


class ArtifactKind(CommitKind):
    """One kind of artifact directory. Subclasses set the class attributes and override the hooks; the
    public methods keep the invariants (manifest kind checked, commit through the worker: `CommitKind`).
    `name` (the manifest's `kind` string) comes from `CommitKind`."""

    group: str = ""  # its place in an Inventory and in status/report JSON
    icon: str = "📦"
    progress: bool = False  # committed ones count as progress (never silently trained over)
    # Its artifact of iteration K is made from iteration K's model (an evaluation of iter_K): retraining
    # K replaces it. False: made before K trains and reused by a restart of K (data/iter_K).
    follows_training: bool = False

    # ---- the scan pattern --------------------------------------------------------------------------
    def entries(self, scan: Scan) -> list[Entry]:
        """This kind's directories (its scan pattern; the hook a new kind overrides): by default those
        the layout's scanner names with this kind, which are only the built-in kinds'."""
        return [e for e in scan.entries if getattr(e.kind, "value", e.kind) == self.name]

    # ---- discovery -----------------------------------------------------------------------------------
    def discover(self, scan: Scan) -> list[Any]:
        """Every directory of this kind, classified, in the inventory's order."""
        found = [a for a in (self.classify(e, scan) for e in self.entries(scan)) if a is not None]
        return self.finish(found, scan)

    def classify(self, entry: Entry, scan: Scan) -> Any:
        """One found directory as an artifact (None: not listed). Default: an artifact of an iteration,
        its status from the manifest header, torn without one."""
        status, _, problem = self.header_status(scan.root / entry.rel)
        return DataArtifact(entry.rel, entry.number, status, problem, entry.symlink)

    def finish(self, found: list[Any], scan: Scan) -> list[Any]:
        """Whatever needs all of this kind at once (ordering, marks); default: by iteration."""
        return sorted(found, key=lambda a: (a.iteration, a.path))

    def header_status(self, directory: Path) -> tuple[Status, ManifestHeader | None, str | None]:
        """Status from the manifest's header only (no file list, no stat of every file: thousands of
        artifacts are listed in milliseconds). Sizes and checksums are checked when an artifact is
        chosen (deep verification), where a damaged one is rejected and the next one tried."""
        try:
            header = read_header(str(directory))
        except ManifestError as e:
            return Status.CORRUPT, None, str(e)
        if header is None:
            return Status.TORN, None, NO_MANIFEST
        if header.kind != self.name:
            return Status.CORRUPT, header, f"manifest says kind {header.kind!r}, expected {self.name!r}"
        return Status.COMMITTED, header, None

    # ---- the check -------------------------------------------------------------------------------------
    def check(self, directory: Path) -> list[str]:
        """Problems of a directory without a manifest (written by another tool). Default: none known."""
        return []

    def verify(self, root: Path, artifact: Any) -> list[str]:
        """Deep verification: every byte against the manifest's checksums, or `check` for a directory
        another tool wrote. Raises ManifestError when the manifest cannot be read."""
        directory = Path(root) / artifact.path
        manifest = None if getattr(artifact, "foreign", False) else read_manifest(directory)
        if manifest is None:
            return self.check(directory)
        return verify_checksums(directory, self.expected(manifest, artifact))

    def expected(self, manifest: Manifest, artifact: Any) -> Manifest:
        """The manifest deep verification holds the artifact to (a hook: what may be recreated is left out)."""
        return manifest

    def link_problems(self, root: Path, artifact: Any) -> list[str]:
        """What `itertrain verify` adds beyond the bytes (a hook: what an artifact needs elsewhere)."""
        return []

    # ---- what a restart replaces -------------------------------------------------------------------------
    def superseded(self, artifact: Any, iteration: int, step: int) -> bool:
        """Whether a run that trains `iteration` from `step` replaces `artifact`: the plan moves it to
        superseded/ before training (never overwritten). Default: committed artifacts of later
        iterations, and of `iteration` itself when the kind `follows_training`. Trainer checkpoints
        and iteration models are the plan's own choice (`decide`), not asked here."""
        first = iteration if self.follows_training else iteration + 1
        return artifact.status == Status.COMMITTED and artifact.iteration >= first

    # ---- how it is shown ---------------------------------------------------------------------------------
    def describe(self, artifact: Any, label: str, in_flight: bool = False) -> str:
        """Its line in `itertrain status` (`label`: its status as shown; `in_flight`: a live run writes it)."""
        return f"  {self.icon} {artifact.path:<24} iteration {artifact.iteration:<4} {label}"

    def to_json(self, artifact: Any) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(artifact), "status": artifact.status.value}


class IterationModelKind(ArtifactKind, IterationModelCommit):
    """`iter_K/` (and the guide's `base_model/` as iteration 0): the weights an iteration ends with."""

    group, icon, progress = "iteration_models", "🎯", True

    def classify(self, entry: Entry, scan: Scan) -> IterationModel:
        directory = scan.root / entry.rel
        status, header, problem = self.header_status(directory)
        foreign = False
        aux: tuple[str, ...] = ()
        if status == Status.TORN and (scan.manifestless_is_foreign(entry.rel) or entry.rel == BASE_MODEL_DIR):
            problems = self.check(directory)
            status, problem = (Status.INVALID, "; ".join(problems)) if problems else (Status.UNVERIFIED, None)
            foreign = True
            config = ADAPTER_CONFIG_NAME if holds_adapter_only(directory) else CONFIG_NAME  # a LoRA adapter dir
            if not (directory / config).exists() and status == Status.UNVERIFIED:
                aux = (config,)
        elif header is not None and header.iteration != entry.number:
            status, problem = Status.CORRUPT, f"manifest says iteration {header.iteration}, the name says {entry.number}"
        return IterationModel(entry.rel, entry.number, status, mtime(directory), problem, aux, foreign, entry.symlink)

    def check(self, directory: Path) -> list[str]:
        return structural_problems(directory, self.name)

    def expected(self, manifest: Manifest, artifact: Any) -> Manifest:
        """Config/tokenizer files known to be missing are recreated from the base model on resume."""
        missing = getattr(artifact, "missing_aux", ())
        if not missing:
            return manifest
        return replace(manifest, files={k: v for k, v in manifest.files.items() if k not in missing})

    def link_problems(self, root: Path, artifact: Any) -> list[str]:
        from itertrain.lora.links import base_model_problems

        return list(base_model_problems(root, [artifact.path]).values())

    def describe(self, artifact: Any, label: str, in_flight: bool = False) -> str:
        extra = f" — {artifact.problem}" if artifact.problem else ""
        aux = (f" (missing {', '.join(artifact.missing_aux)}: {recreated_from(artifact.missing_aux)} on resume)"
               if artifact.missing_aux else "")
        return f"  {self.icon} {artifact.path:<24} iteration {artifact.iteration:<4} {label}{aux}{extra}"


class TrainerCheckpointKind(ArtifactKind, TrainerCheckpointCommit):
    """`checkpoint-S/` (top level, or kept inside an `iter_K/` of ours): HF Trainer's full state."""

    group, icon, progress = "checkpoints", "📁", True

    def entries(self, scan: Scan) -> list[Entry]:
        """Checkpoints kept inside an iteration model are listed when that model is one of ours."""
        ours = {m.path for m in scan.found.get("iteration_models", []) if m.status.usable and not m.foreign}
        return [e for e in super().entries(scan) if is_top_level(e.rel) or e.rel.split("/", 1)[0] in ours]

    def classify(self, entry: Entry, scan: Scan) -> TrainerCheckpoint:
        directory = scan.root / entry.rel
        status, header, problem = self.header_status(directory)
        if status == Status.TORN and is_top_level(entry.rel) and scan.manifestless_is_foreign(entry.rel):
            # Only foreign checkpoints are ordered by modification time: stat just those.
            problems = self.check(directory)
            status, problem = (Status.INVALID, "; ".join(problems)) if problems else (Status.UNVERIFIED, None)
            return TrainerCheckpoint(entry.rel, _foreign_step(directory, entry.number), -1, status, mtime(directory),
                                     problem, None, True, entry.symlink)
        return TrainerCheckpoint(entry.rel, entry.number, header.iteration if header else -1, status, 0.0,
                                 problem, header.world_size if header else None, False, entry.symlink)

    def finish(self, found: list[Any], scan: Scan) -> list[Any]:
        """A foreign checkpoint's iteration is inferred from the newest model; committed ones of an
        iteration whose model is usable are marked stale (shown so, still usable)."""
        models = scan.found.get("iteration_models", [])
        newest = max((m for m in models if m.status.usable), key=model_order, default=None)
        found = [_with_inferred_iteration(c, newest) if c.foreign and c.status.usable else c for c in found]
        return sorted(mark_stale(found, models), key=lambda c: (c.iteration, c.step, c.path))

    def check(self, directory: Path) -> list[str]:
        return structural_problems(directory, self.name)

    def describe(self, artifact: Any, label: str, in_flight: bool = False) -> str:
        extra = f" — {artifact.problem}" if artifact.problem and not in_flight else ""
        it = str(artifact.iteration) if artifact.iteration >= 0 else "?"  # a save without a manifest says no iteration
        return f"  {self.icon} {artifact.path:<24} iteration {it:<4} step {artifact.step:<7} {label}{extra}"


class DataKind(ArtifactKind, DataCommit):
    """`data/iter_K/`: the data an iteration generated and trained on (a restart of K reuses it)."""

    group, icon = "data", "📦"


_REGISTRY: list[ArtifactKind] = [IterationModelKind(), TrainerCheckpointKind(), DataKind()]


def registered() -> tuple[ArtifactKind, ...]:
    """Every kind, in discovery and display order (iteration models first: checkpoints need them)."""
    return tuple(_REGISTRY)


def register(kind: ArtifactKind) -> ArtifactKind:
    """Add a kind (after the built-in ones); its name and group must be new."""
    if any(k.name == kind.name or k.group == kind.group for k in _REGISTRY):
        raise ValueError(f"an artifact kind named {kind.name!r} or grouped as {kind.group!r} is already registered")
    _REGISTRY.append(kind)
    allow_kind(kind.name)
    return kind


def unregister(kind: ArtifactKind) -> None:
    """Remove a kind added with `register`."""
    _REGISTRY.remove(kind)
    allow_kind(kind.name, False)


def kind_of_path(groups: dict[str, tuple[Any, ...]], rel: str) -> tuple[ArtifactKind, Any]:
    """The kind and artifact at `rel` among an inventory's groups. KeyError when none."""
    for kind in _REGISTRY:
        for artifact in groups.get(kind.group, ()):
            if artifact.path == rel:
                return kind, artifact
    raise KeyError(rel)


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _foreign_step(directory: Path, fallback: int) -> int:
    try:
        return int(json.loads((directory / TRAINER_STATE_NAME).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def _with_inferred_iteration(ckpt: TrainerCheckpoint, newest_model: IterationModel | None) -> TrainerCheckpoint:
    """A foreign checkpoint has no iteration: it belongs to the iteration after the newest model
    unless that model is newer on disk (then the checkpoint is from the model's iteration)."""
    if newest_model is None:
        return replace(ckpt, iteration=0)
    if newest_model.mtime >= ckpt.mtime:
        return replace(ckpt, iteration=newest_model.iteration)
    return replace(ckpt, iteration=newest_model.iteration + 1)


def recreated_from(missing: list[str] | tuple[str, ...]) -> str:
    """Where resume recreates missing small files from: adapter_config.json from the LoRA settings the
    manifest records, the others (config, tokenizer) from the base model."""
    sources = []
    if ADAPTER_CONFIG_NAME in missing:
        sources.append(f"{ADAPTER_CONFIG_NAME} recreated from the recorded LoRA settings")
    if any(n != ADAPTER_CONFIG_NAME for n in missing):
        sources.append("the others from the base model" if sources else "recreated from the base model")
    return ", ".join(sources)
