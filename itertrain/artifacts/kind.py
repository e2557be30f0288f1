"""The writing half of an artifact kind: the `kind` string its manifests carry and its commit.

It sits on the artifacts floor so that `CheckpointManager` commits every artifact through its kind;
the recovery floor's `ArtifactKind` (recovery/kinds.py) subclasses it and adds the scan pattern,
the check and how an artifact is shown. `commit` and `submit` own the invariants, as every kind's
public save: the job goes through the commit worker, which hashes and fsyncs the files and writes
the manifest last, atomically (until then the directory is torn). A kind sets `name` and nothing
here needs overriding. The `name` is on disk forever: never renamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from itertrain.artifacts.commit import CommitJob, CommitWorker
from itertrain.artifacts.manifest import Manifest
from itertrain.layout import Kind


class CommitKind:
    """A kind of artifact directory as written: its manifest `kind` string and its commit."""

    name: str = ""  # the manifest's `kind` string

    def commit(self, directory: Path, *, iteration: int, step: int = 0, lineage: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None, world_size: int = 1, fsync: bool = True,
               worker: CommitWorker | None = None, before: Callable[[], None] | None = None,
               after: Callable[[Manifest], None] | None = None) -> Manifest:
        """Commit a written directory of this kind now (rank 0), after any job `worker` still runs.
        `before` runs first (e.g. a fault point), `after` once the manifest landed (e.g. retention)."""
        worker = worker or CommitWorker(fsync=fsync, world_size=world_size)
        return worker.commit(self._job(directory, iteration, step, lineage, extra, before, after))

    def submit(self, directory: Path, *, worker: CommitWorker, iteration: int, step: int = 0,
               lineage: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
               before: Callable[[], None] | None = None, after: Callable[[Manifest], None] | None = None) -> None:
        """As `commit`, on `worker`'s background thread when it has one: the directory counts as
        committed only once its manifest lands (`worker.wait()` re-raises a failure)."""
        worker.submit(self._job(directory, iteration, step, lineage, extra, before, after))

    def _job(self, directory: Path, iteration: int, step: int, lineage: dict[str, Any] | None,
             extra: dict[str, Any] | None, before: Callable[[], None] | None,
             after: Callable[[Manifest], None] | None) -> CommitJob:
        if not self.name:
            raise TypeError(f"{type(self).__name__} has no manifest kind name")
        return CommitJob(Path(directory), self.name, iteration, step, dict(lineage or {}), dict(extra or {}),
                         before=before, after=after)


class IterationModelCommit(CommitKind):
    """`iter_K/`: the weights an iteration ends with."""

    name = Kind.ITERATION_MODEL.value


class TrainerCheckpointCommit(CommitKind):
    """`checkpoint-S/`: HF Trainer's full state."""

    name = Kind.TRAINER_CHECKPOINT.value


class DataCommit(CommitKind):
    """`data/iter_K/`: the data an iteration generated and trained on."""

    name = Kind.DATA.value


ITERATION_MODEL = IterationModelCommit()
TRAINER_CHECKPOINT = TrainerCheckpointCommit()
DATA = DataCommit()
