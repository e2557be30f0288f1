"""The commit worker: hash, fsync and write an artifact's manifest last (rank 0), inline or on one
background thread while training goes on.

A job carries everything it needs (directory, kind, iteration, step, lineage, and what to run after
the manifest landed): the worker never reads state the training thread may change meanwhile. Jobs
run one at a time, in order; `wait()` joins the running one and re-raises its error on the caller's
thread, and the run lock is released only after `close()` (the lock is held until every
background write finished or was abandoned).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from itertrain.artifacts.manifest import FileEntry, Manifest, commit_directory
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import describe_write_error
from itertrain.layout import Kind


@dataclass(frozen=True)
class CommitJob:
    directory: Path
    kind: Kind | str  # the manifest's kind string (an artifact kind's `name`)
    iteration: int
    step: int
    lineage: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    before: Callable[[], None] | None = None  # e.g. a fault point
    after: Callable[[Manifest], None] | None = None  # e.g. rotation, once the manifest landed
    written: Mapping[str, FileEntry] | None = None  # hashed while written (--async_save): no read-back


class CommitWorker:
    """Commits artifact directories, one job at a time (rank 0 only)."""

    def __init__(self, *, fsync: bool = True, world_size: int = 1, background: bool = False):
        self.fsync = fsync
        self.world_size = world_size
        self.background = background
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # set when the running job ended (landed or failed)
        self._done.set()
        self._error: BaseException | None = None

    def commit(self, job: CommitJob) -> Manifest:
        """Run `job` now, on this thread (after any job still running)."""
        self.wait()
        return self._run(job)

    def submit(self, job: CommitJob) -> None:
        """Run `job` on the background thread when enabled, else now. Waits for the previous job."""
        self.wait()
        if not self.background:
            self._run(job)
            return
        self._done.clear()
        self._thread = threading.Thread(target=self._run_captured, args=(job,), daemon=True,
                                        name=f"itertrain-commit-{job.directory.name}")
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._done.is_set()

    def wait(self) -> None:
        """Finish the running job; raise its error, if any, here.

        Waits on an Event, not on Thread.join(): in Python 3.11 a Ctrl-C that interrupts join() marks
        the thread as stopped while it still runs (bpo-45274), and every later join() returns at once,
        which would let the run lock go while a manifest is still being written."""
        if self._thread is not None:
            self._done.wait()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish the running job, dropping its error (used on the way out after another failure).
        Another Ctrl-C does not cut it short: the lock is held until the job has landed or failed."""
        while True:
            try:
                self.wait()
                return
            except KeyboardInterrupt:
                continue
            except BaseException:  # noqa: BLE001 - already failing; the first error is the one reported
                return

    def _run_captured(self, job: CommitJob) -> None:
        try:
            self._run(job)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e
        finally:
            self._done.set()

    def _run(self, job: CommitJob) -> Manifest:
        if job.before is not None:
            job.before()
        try:
            manifest = commit_directory(
                job.directory, kind=str(getattr(job.kind, "value", job.kind)), iteration=job.iteration, step=job.step,
                lineage=dict(job.lineage), world_size=self.world_size, extra=dict(job.extra), fsync=self.fsync,
                written=job.written,
            )
        except ArtifactWriteError:
            raise
        except OSError as e:
            raise ArtifactWriteError(describe_write_error(e, job.directory)) from e
        if job.after is not None:
            job.after(manifest)
        return manifest
