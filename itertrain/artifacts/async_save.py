"""`--async_save`: the training loop pays for a copy into host memory; a writer thread pays for the disk.

HF Trainer's own `_save_checkpoint` runs at the save step, unchanged (a TRL trainer's override
included: DPO's model card, GRPO's, ...), inside `AsyncSaver.capturing`. Only its two large writes are
deferred, each at a public seam of HF's save:
- `Trainer._save(output_dir)` (weights, config, tokenizer, training_args.bin): the model's state dict is
  copied into reused host buffers and HF's own `_save(output_dir, state_dict=copy)` runs later on the
  writer thread; `save_pretrained` gets the same tensors it would have taken itself, hence the same bytes;
- `Trainer._save_optimizer_and_scheduler(output_dir)`: the optimizer's and the scheduler's state dicts
  are copied, and HF's own method runs later on the writer thread against a view of the trainer whose
  `optimizer` / `lr_scheduler` return those copies.
Everything else HF writes at that step (RNG states, scaler, trainer_state.json, a model card) is
written by HF at once, as without `--async_save`. Nothing of HF's code is repeated here, so no
transformers release is singled out.

The writer thread (every rank) runs the deferred writes in HF's order. Then:
- rank r > 0 publishes `checkpoint-S/.itertrain-written-rank{r}.json` (atomic);
- rank 0 waits for every other rank's marker (at most `--dist_io_timeout_s`), removes them and calls
  `on_written(best)`: the CheckpointManager hashes, fsyncs and commits the manifest, then retention.
A crash at any moment before that leaves the directory without manifest: torn, never used.

No helper process is involved: a stop signal sent to the whole process group (torchrun's
`killpg(SIGTERM)`, SLURM, Kubernetes) reaches only the training process, whose preemption handler
lets the write in flight finish and commit before the preemption checkpoint is saved.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from itertrain import faults
from itertrain.artifacts.snapshot import HostBufferPool, copy_tree, located_as, unsupported_reason
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import atomic_write_json, describe_library_write_error, fsync_dir

WRITTEN_MARKER = ".itertrain-written-rank{rank}.json"
OnWritten = Callable[["str | None"], None]  # rank 0: (best checkpoint dir) once every rank's files are written

# Fault points in the writer, for the crash harness (besides `checkpoint.optimizer`, reached before
# HF's optimizer write as on the synchronous path).
WEIGHTS_WRITTEN = "checkpoint.write.weights"  # model.safetensors written; optimizer.pt not yet
OPTIMIZER_WRITE = "checkpoint.write.optimizer"  # HF's optimizer write takes the state to torch.save
WRITTEN = "checkpoint.write.done"  # this rank's files are written; its marker / the commit is not


class Abandoned(Exception):
    """The write was cancelled (the checkpoint directory stays without a manifest: torn)."""


@dataclass
class Capture:
    """One checkpoint on one rank: HF's deferred writes, each with the host copies it reads."""
    step: int
    directory: Path
    rank: int
    world_size: int
    writes: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (what, HF's own call)
    tags: dict[int, str] = field(default_factory=dict)  # host copy -> device location (see `located_as`)
    ready: Any = None  # a torch.cuda.Event after the device->host copies (None on CPU)
    tensor_bytes: int = 0
    seconds: float = 0.0  # the copies (enqueued, on CUDA) at the save step

    def covers(self, output_dir: str | os.PathLike[str]) -> bool:
        return os.path.abspath(output_dir) == str(self.directory)


class _AtSaveStep:
    """The trainer as HF's save code reads it, with `optimizer` and `lr_scheduler` answering
    `state_dict()` with their copies taken at the save step; any other attribute is the trainer's."""

    def __init__(self, trainer: Any, optimizer_state: Any, scheduler_state: Any) -> None:
        self._trainer = trainer
        self.optimizer = _Frozen(optimizer_state, fault=OPTIMIZER_WRITE)
        self.lr_scheduler = _Frozen(scheduler_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


@dataclass(frozen=True)
class _Frozen:
    state: Any
    fault: str | None = None  # a fault point reached as HF takes the state to write it

    def state_dict(self) -> Any:
        if self.fault:
            faults.point(self.fault)
        return self.state


# ---- completion across ranks ------------------------------------------------------------------------------
def publish_written(cap: Capture, error: str | None = None, described: bool = False) -> None:
    """Rank r > 0: this rank's files of checkpoint-S are written (or failed: `error`; `described`: it is
    the readable sentence of fsutil.describe_write_error)."""
    atomic_write_json(cap.directory / WRITTEN_MARKER.format(rank=cap.rank),
                      {"step": cap.step, "rank": cap.rank, "error": error, "described": described})


def collect_written(cap: Capture, cancel: threading.Event, *, timeout: float, poll: float = 0.05) -> None:
    """Rank 0: wait for every other rank's marker (at most `timeout` s), then remove the markers."""
    pending = set(range(1, cap.world_size))
    deadline = time.monotonic() + timeout
    while pending:
        for r in sorted(pending):
            try:
                marker = json.loads((cap.directory / WRITTEN_MARKER.format(rank=r)).read_text())
            except FileNotFoundError:
                continue
            if marker.get("step") != cap.step or marker.get("error"):
                if marker.get("described"):  # the sentence that rank printed, e.g. "the disk is full (ENOSPC)"
                    raise ArtifactWriteError(f"rank {r}: {marker['error']}")
                raise ArtifactWriteError(f"rank {r} could not write {cap.directory}: {marker.get('error')}")
            pending.discard(r)
        if pending:
            if cancel.is_set():
                raise Abandoned(f"the commit of {cap.directory} was abandoned")
            if time.monotonic() > deadline:
                raise ArtifactWriteError(f"ranks {sorted(pending)} did not finish writing {cap.directory} within "
                                         f"--dist_io_timeout_s={timeout:g}")
            time.sleep(poll)
    for r in range(1, cap.world_size):
        (cap.directory / WRITTEN_MARKER.format(rank=r)).unlink(missing_ok=True)
    if cap.world_size > 1:
        fsync_dir(cap.directory)


# ---- the writer thread --------------------------------------------------------------------------------------
WRITER_NICE = 10  # how much lower than training the writer's CPU priority is


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread). On a host with few cores the
    training steps then win the cores and the write takes what is left."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class BackgroundWriter:
    """One background write at a time. `start` returns at once; `wait` waits for it and raises its
    error on the caller's thread; `abandon` stops it before its next file without raising.

    Waits on an Event, not on Thread.join(): in Python 3.11 a Ctrl-C that interrupts join() marks the
    thread as stopped while it still runs (bpo-45274), and a later join() would return at once, letting
    the run lock go while the writer is still writing (the same reason as in `CommitWorker.wait`)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # set when the running job ended (written, failed or abandoned)
        self._done.set()
        self._cancel = threading.Event()
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return not self._done.is_set()

    def start(self, name: str, job: Callable[[threading.Event], None]) -> None:
        self.wait()
        self._cancel = threading.Event()
        self._done.clear()
        self._thread = threading.Thread(target=self._run, args=(job, self._cancel), name=name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[threading.Event], None], cancel: threading.Event) -> None:
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
        """Cancel the running write and wait for it (the file being written is finished first); False if
        it still runs after `timeout` s (it then dies with the process: a daemon thread). Errors are dropped."""
        self._cancel.set()
        done = self._done.wait(timeout)
        if done:
            self._thread = None
        self._error = None
        return done


def _write(cap: Capture, cancel: threading.Event) -> None:
    """Run HF's deferred writes of `cap` in order (writer thread)."""
    if cap.ready is not None:
        cap.ready.synchronize()  # the device->host copies are complete
    for what, call in cap.writes:
        if cancel.is_set():
            raise Abandoned(f"the write of {cap.directory} was abandoned")
        with located_as(cap.tags):
            call()
        if what == "weights":
            faults.point(WEIGHTS_WRITTEN)
    faults.point(WRITTEN)


class AsyncSaver:
    """Asynchronous HF checkpoints for one experiment (one per rank): capture, write, commit."""

    def __init__(self, *, timeout: float = 1800.0) -> None:
        self.timeout = timeout  # --dist_io_timeout_s: rank 0 waits this long for the other ranks' files
        self.pool = HostBufferPool()
        self.writer = BackgroundWriter()
        self.last_step: int | None = None  # the step of the newest checkpoint saved this way
        self.last: Capture | None = None  # its capture, for timings (the tensors are the pool's)
        self._capture: Capture | None = None  # the save in progress on the training thread

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

    @contextlib.contextmanager
    def capturing(self, trainer: Any, output_dir: str | os.PathLike[str]) -> Iterator[Capture]:
        """Around HF's `_save_checkpoint` (training thread, every rank): its large writes into
        `output_dir` are deferred (`defer_weights`, `defer_optimizer`) instead of done."""
        self.wait()  # its buffers are reused; commits land in order
        args = trainer.args
        cap = Capture(trainer.state.global_step, Path(os.path.abspath(output_dir)), args.process_index,
                      args.world_size)
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
        if torch.cuda.is_available() and cap.tensor_bytes:
            cap.ready = torch.cuda.Event()
            cap.ready.record()  # on the current stream: later in-place updates are ordered after the copies

    def _copy(self, obj: Any, namespace: str) -> Any:
        cap = self._capture
        assert cap is not None
        started = time.perf_counter()
        host, nbytes = copy_tree(obj, self.pool, namespace, cap.tags)
        cap.tensor_bytes += nbytes
        cap.seconds += time.perf_counter() - started
        return host

    def defer_weights(self, trainer: Any, output_dir: str | None, state_dict: Any,
                      hf_save: Callable[..., None]) -> bool:
        """From `Trainer._save`: when a capture covers `output_dir`, copy the model's state dict now and
        run `hf_save(output_dir, state_dict=copy)` (HF's own `_save`) on the writer. False: not deferred."""
        cap = self._capture
        if cap is None or output_dir is None or state_dict is not None or not cap.covers(output_dir) \
                or not trainer.args.should_save:
            return False
        host = self._copy(trainer.model.state_dict(), "weights")
        cap.writes.append(("weights", lambda: hf_save(output_dir, state_dict=host)))
        return True

    def defer_optimizer(self, trainer: Any, output_dir: str, hf_method: Callable[[Any, str], None]) -> bool:
        """From `Trainer._save_optimizer_and_scheduler`: when a capture covers `output_dir`, copy the
        optimizer's and scheduler's state dicts now and run HF's own method on the writer, reading the
        copies. False: not deferred."""
        cap = self._capture
        if cap is None or not cap.covers(output_dir) or not trainer.args.should_save:
            return False
        optimizer = self._copy(trainer.optimizer.state_dict(), "optimizer")
        scheduler = copy.deepcopy(trainer.lr_scheduler.state_dict())
        view = _AtSaveStep(trainer, optimizer, scheduler)

        def write() -> None:
            faults.point("checkpoint.optimizer")  # the weights are written, the optimizer is not yet
            hf_method(view, output_dir)

        cap.writes.append(("optimizer", write))
        return True

    def start(self, cap: Capture, on_written: OnWritten, best: str | None) -> None:
        """Write `cap` on the writer thread; rank 0 then commits it through `on_written(best)`."""

        def job(cancel: threading.Event) -> None:
            try:
                _write(cap, cancel)
            except Abandoned:
                if cap.rank:
                    publish_written(cap, error="abandoned")
                raise
            except BaseException as e:
                message = str(e) if isinstance(e, ArtifactWriteError) else describe_library_write_error(e, cap.directory)
                if cap.rank:  # rank 0 reports this rank's failure in the very words this rank would use
                    publish_written(cap, error=message or f"{type(e).__name__}: {e}", described=message is not None)
                if message is None or isinstance(e, ArtifactWriteError):
                    raise
                raise ArtifactWriteError(message) from e
            if cap.rank:
                publish_written(cap)
                return
            collect_written(cap, cancel, timeout=self.timeout)
            if cancel.is_set():
                raise Abandoned(f"the commit of {cap.directory} was abandoned")
            on_written(best)

        self.writer.start(f"itertrain-async-save-{cap.step}", job)
        self.last_step, self.last = cap.step, cap
