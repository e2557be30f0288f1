"""`--async_save`: the training loop pays for a snapshot; a background writer pays for the disk.

At a save step `AsyncSaver.save` repeats HF Trainer's `_save_checkpoint` (transformers 5.24,
trainer.py 3363-3430) in HF's order, with the file writes replaced by a snapshot into host memory:
wait for the previous writer, `store_flos` (a collective under DDP: every rank), create
`checkpoint-S/`, the best-model bookkeeping (a barrier under DDP), the snapshot (stateful callbacks,
then trainer_state.json). A writer thread then writes HF's own files (byte for byte what HF would
have written at that step), hashing them on the way and fsyncing each. When this rank's files are
durable:
- rank r > 0 publishes its digests in `checkpoint-S/.itertrain-written-rank{r}.json` (atomic);
- rank 0 waits for every other rank's marker, removes them, and calls `on_written(digests, best)`:
  the CheckpointManager commits the manifest from those digests (no read-back), then retention,
  then HF's own rotation. A crash at any moment before that leaves the directory without manifest:
  torn, never used.

The API the rest of itertrain needs is small: `save`, `wait` (finish the write and its commit, raise
its error), `abandon` (stop it; the checkpoint stays uncommitted), `busy`, `release` (free the host
buffers). `wait` and `abandon` may be called on any rank, at any time, from the training thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

from itertrain import faults
from itertrain.artifacts.hashed_io import Abandoned, Cancel, HashingFile, torch_save_hashed, write_tensor
from itertrain.artifacts.manifest import FileEntry
from itertrain.artifacts.snapshot import (
    BytesFile,
    HostBufferPool,
    Snapshot,
    TorchFile,
    take_snapshot,
    unsupported_reason,
    untag,
)
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import atomic_write_json, describe_library_write_error, fsync_dir

WRITTEN_MARKER = ".itertrain-written-rank{rank}.json"
Digests = dict[str, FileEntry]
OnWritten = Callable[[Digests, "str | None"], None]  # rank 0: (every rank's files, best checkpoint dir)

# Fault points inside the writer, for the crash harness (besides `checkpoint.optimizer`, reached as in
# HF's save: the weights are written, the optimizer is not).
MID_WEIGHTS = "checkpoint.write.weights"  # inside model.safetensors: header and first tensor written
MID_OPTIMIZER = "checkpoint.write.optimizer"  # inside optimizer.pt: its first MiB written
WRITTEN = "checkpoint.write.done"  # this rank's files are durable; its marker / the commit is not


def write_snapshot(snap: Snapshot, *, fsync: bool, cancel: Cancel | None = None) -> Digests:
    """Write the snapshot's files into `snap.directory`: {rel: FileEntry}, hashed as written.

    Each file is fsynced (with `fsync`), then the directory."""
    directory = snap.directory
    directory.mkdir(parents=True, exist_ok=True)
    snap.synchronize()
    digests: Digests = {}
    for item in snap.files:
        path = directory / item.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(item, TorchFile):
            if item.rel == "optimizer.pt":
                faults.point("checkpoint.optimizer")
            try:
                mid = item.rel == "optimizer.pt" and faults.armed(MID_OPTIMIZER)  # hold the pump mid-file only then
                digests[item.rel] = torch_save_hashed(item.obj, str(path), fsync=fsync, cancel=cancel,
                                                      mid_file=(lambda: faults.point(MID_OPTIMIZER)) if mid else None)
            finally:  # a freed buffer's address must never tag an unrelated storage
                untag(item.tagged)
            continue
        f = HashingFile(path, cancel=cancel)
        try:
            if isinstance(item, BytesFile):
                f.write(item.data)
            else:
                f.write(item.header)
                for i, t in enumerate(item.tensors):
                    write_tensor(f, t)
                    if i == 0:
                        faults.point(MID_WEIGHTS)
        except BaseException:
            f.abort()
            raise
        digests[item.rel] = f.close(fsync=fsync)
    if fsync:
        fsync_dir(directory)
    faults.point(WRITTEN)
    return digests


# ---- completion across ranks ------------------------------------------------------------------------------
def publish_written(snap: Snapshot, digests: Digests, error: str | None = None) -> None:
    """Rank r > 0: this rank's files of checkpoint-S are durable (or failed: `error`)."""
    files = {rel: [e.size, e.xxh3] for rel, e in digests.items()}
    atomic_write_json(snap.directory / WRITTEN_MARKER.format(rank=snap.rank),
                      {"step": snap.step, "rank": snap.rank, "error": error, "files": files})


def collect_written(snap: Snapshot, own: Digests, cancel: Cancel, *, timeout: float,
                    poll: float = 0.05) -> Digests:
    """Rank 0: wait for every other rank's marker, merge the digests, remove the markers."""
    merged = dict(own)
    pending = set(range(1, snap.world_size))
    deadline = time.monotonic() + timeout
    while pending:
        for r in sorted(pending):
            path = snap.directory / WRITTEN_MARKER.format(rank=r)
            try:
                marker = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            if marker.get("step") != snap.step or marker.get("error"):
                raise ArtifactWriteError(f"rank {r} could not write {snap.directory}: {marker.get('error')}")
            merged.update({rel: FileEntry(int(v[0]), str(v[1])) for rel, v in marker["files"].items()})
            pending.discard(r)
        if pending:
            if cancel.is_set():
                raise Abandoned(f"the commit of {snap.directory} was abandoned")
            if time.monotonic() > deadline:
                raise ArtifactWriteError(f"ranks {sorted(pending)} did not finish writing {snap.directory} "
                                         f"within {timeout:.0f} s")
            time.sleep(poll)
    for r in range(1, snap.world_size):
        (snap.directory / WRITTEN_MARKER.format(rank=r)).unlink(missing_ok=True)
    if snap.world_size > 1:
        fsync_dir(snap.directory)
    return merged


# ---- the writer thread --------------------------------------------------------------------------------------
WRITER_NICE = 10  # how much lower than training the writer's CPU priority is


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread; the pump process and threads it
    starts inherit it). On a host with few cores the training steps then win the cores and the write
    takes what is left, instead of slowing every step that runs beside it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class BackgroundWriter:
    """One background write at a time. `start` returns at once; `wait` waits for it and raises its
    error on the caller's thread; `abandon` stops it at the next chunk without raising.

    Waits on an Event, not on Thread.join(): in Python 3.11 a Ctrl-C that interrupts join() marks the
    thread as stopped while it still runs (bpo-45274), and a later join() would return at once, letting
    the run lock go while the writer is still writing (the same reason as in `CommitWorker.wait`)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # set when the running job ended (written, failed or abandoned)
        self._done.set()
        self._cancel = Cancel()
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return not self._done.is_set()

    def start(self, name: str, job: Callable[[Cancel], None]) -> None:
        self.wait()
        self._cancel = Cancel()
        self._done.clear()
        self._thread = threading.Thread(target=self._run, args=(job, self._cancel), name=name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[Cancel], None], cancel: Cancel) -> None:
        _yield_cpu()
        try:
            job(cancel)
        except Abandoned:
            pass
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        if self._thread is not None:
            self._done.wait()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def abandon(self, timeout: float = 60.0) -> bool:
        """Cancel the running write and wait for it; False if it is still running after `timeout` s
        (it then dies with the process: a daemon thread). Its error, if any, is dropped."""
        self._cancel.set()
        done = self._done.wait(timeout)
        if done:
            self._thread = None
        self._error = None
        return done


class AsyncSaver:
    """Asynchronous HF checkpoints for one experiment (one per rank): snapshot, write, commit."""

    def __init__(self, *, fsync: bool = True, timeout: float | None = None) -> None:
        self.fsync = fsync
        self.timeout = timeout if timeout is not None else 60.0 * int(os.environ.get("ITERTRAIN_DIST_TIMEOUT_MIN", "30"))
        self.pool = HostBufferPool()
        self.writer = BackgroundWriter()
        self.last_step: int | None = None  # the step of the newest checkpoint saved this way
        self.last: Snapshot | None = None  # its snapshot, for timings (the tensors are the pool's)

    @staticmethod
    def unsupported(trainer: Any, trial: Any = None) -> str | None:
        return unsupported_reason(trainer, trial)

    @property
    def busy(self) -> bool:
        return self.writer.busy

    def wait(self) -> None:
        """Finish the background write of the previous checkpoint (and, on rank 0, its commit); raise
        its error here."""
        self.writer.wait()

    def abandon(self) -> bool:
        """Stop the background write; the checkpoint it was writing stays uncommitted (torn)."""
        return self.writer.abandon()

    def release(self) -> None:
        """Wait, then free the host buffers (the end of an iteration's training)."""
        self.wait()
        self.pool.release()
        self.last_step, self.last = None, None

    def save(self, trainer: Any, trial: Any, on_written: OnWritten) -> Snapshot:
        """HF's `_save_checkpoint` with a snapshot instead of the writes (training thread, every rank)."""
        import torch.distributed as dist
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
        from transformers.training_args import ParallelMode

        self.wait()  # its buffers are reused; commits land in order
        args, state = trainer.args, trainer.state
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()
        run_dir = trainer._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(output_dir, exist_ok=True)  # HF's save_model makes it before the best-model check
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and state.best_global_step:
            if args.parallel_mode == ParallelMode.DISTRIBUTED:
                dist.barrier()
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
            if os.path.exists(best_dir):
                state.best_model_checkpoint = best_dir
        snap = take_snapshot(trainer, output_dir, self.pool)
        best, limit, should_save = state.best_model_checkpoint, args.save_total_limit, args.should_save

        def job(cancel: Cancel) -> None:
            try:
                digests = write_snapshot(snap, fsync=self.fsync, cancel=cancel)
            except Abandoned:
                if snap.rank:
                    publish_written(snap, {}, error="abandoned")
                raise
            except BaseException as e:
                if snap.rank:
                    publish_written(snap, {}, error=f"{type(e).__name__}: {e}")
                message = None if isinstance(e, ArtifactWriteError) else describe_library_write_error(e, snap.directory)
                if message is None:
                    raise
                raise ArtifactWriteError(message) from e
            if snap.rank:
                publish_written(snap, digests)
                return
            digests = collect_written(snap, digests, cancel, timeout=self.timeout)
            if cancel.is_set():
                raise Abandoned(f"the commit of {snap.directory} was abandoned")
            on_written(digests, best)
            if should_save and limit:  # HF rotates right after its save; here once the checkpoint is written
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=best, use_mtime=True)

        self.writer.start(f"itertrain-async-save-{snap.step}", job)
        self.last_step, self.last = snap.step, snap
        return snap
