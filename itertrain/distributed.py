"""The few collective operations the loop needs: rank 0 decides, everyone follows.

Three process groups, all created by `init` on every rank before the flags are parsed (HF's TrainingArguments would
otherwise create the default group while parsing, through accelerate, with a 30-minute timeout on CPU
whatever --ddp_timeout says; accelerate reuses a group that exists):
- the default group (gloo on CPU, NCCL on GPU): training's collectives, `--dist_timeout_s`;
- a gloo group for itertrain's own collectives (plan broadcast, commit barriers, the preemption check),
  `--dist_io_timeout_s`: in these the other ranks often wait while rank 0 alone verifies, writes or
  hashes an artifact, which may take far longer than a training step;
- a gloo group for the failure probe (`failures.probe`) alone: a probe on the io group could pair with
  a peer's commit barrier or preemption all-reduce and let it go on as if every rank were there.
A rank that dies is noticed at once (its sockets close); one that freezes, within the timeout. Either
way every rank stops with one line (`DistributedFailure`), and torchrun restarts the job when it may.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from itertrain import failures
from itertrain.errors import DistributedFailure, ItertrainError

T = TypeVar("T")

_io_group: Any = None
_probe_group: Any = None
_io_timeout_s: float = 1800.0
INIT_FAILED_EXIT = 1  # torchrun restarts on any non-zero code



def is_comm_error(e: BaseException) -> bool:
    """True when `e`'s type says that another rank is gone or did not answer (torch's DistError family:
    DistBackendError, DistNetworkError, DistStoreError). Never decided by an error's text: gloo's plain
    RuntimeError for a lost peer is told apart by `failures.peer_gone` instead."""
    return isinstance(e, dist.DistError)


def short(e: BaseException) -> str:
    """The gist of a library error: its first sentence, without gloo's source-file prefix."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"^\[[^\]]*\.(cpp|cc|h):\d+\]\s*", "", first)
    return first.split(". ")[0][:200]


def lost_contact(e: BaseException, doing: str, timeout_s: float | None = None) -> DistributedFailure:
    """The one-line failure for a collective that found a peer gone or silent."""
    first = short(e)
    bound = f" or did not answer within {timeout_s:.0f}s" if timeout_s else ""
    return DistributedFailure(
        f"rank {rank()} lost contact with another rank while {doing} (a rank or node died, was stopped{bound}): "
        f"{first}. Committed work is intact; relaunch with --resume_from auto --resume_from_iteration auto"
    )


def init(timeout_s: float = 300.0, io_timeout_s: float = 1800.0) -> None:
    """Join the torchrun process group (before the flags are parsed; a no-op for one process).

    A fresh key space per torchrun restart (`launcher.rendezvous_store`), and a watchdog: an init that
    does not finish within `timeout_s` (a peer that never comes) exits with one line, so that torchrun
    can restart; an init that fails does the same through `DistributedFailure`."""
    global _io_group, _io_timeout_s, _probe_group
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _attach_single_worker(timeout_s)
        return
    from itertrain import launcher

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    watchdog = threading.Timer(timeout_s, _init_expired, args=(timeout_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        store = launcher.rendezvous_store(timeout)
        if launcher.store_client is not None:
            failures.attach(launcher.store_client[0], launcher.run_id(), launcher.restart_count(),
                            launcher.store_client[1])
        _stop_on_earlier_final()
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        _io_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout_s))
        _probe_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout_s))  # probe bounds its own
        _io_timeout_s = io_timeout_s
    except ItertrainError:
        raise
    except (RuntimeError, ValueError, OSError) as e:
        raise DistributedFailure(f"process-group init failed on rank {os.environ.get('RANK')} "
                                 f"(restart {launcher.restart_count()}): {short(e)}") from e
    finally:
        watchdog.cancel()


def _stop_on_earlier_final() -> None:
    final = failures.earlier_final()
    if final is not None:  # a deterministic failure: repeating it would only repeat its line
        raise final.error(f" (attempt {final.attempt} of this torchrun launch ended on it; not retried: "
                          "fix it and relaunch)")


def _attach_single_worker(timeout_s: float) -> None:
    """One worker under torchrun (--nproc_per_node=1): no process group, but the agent's store still
    tells the restarts torchrun makes that a failure of the user's ended an earlier attempt."""
    from itertrain import launcher

    if not launcher.under_torchrun() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        launcher.rendezvous_store(timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError):
        return  # best effort: without the store a restart only repeats the failure
    if launcher.store_client is not None:
        failures.attach(launcher.store_client[0], launcher.run_id(), launcher.restart_count(), True)
        _stop_on_earlier_final()


def _init_expired(timeout_s: float) -> None:
    from itertrain import console, launcher

    if console.prints_messages(every_node=True):
        console.emit(f"itertrain: error: process-group init did not finish within --dist_timeout_s={timeout_s:.0f}s "
                     f"(rank {os.environ.get('RANK')}, restart {launcher.restart_count()}): a rank or node did not "
                     "join; exiting so that torchrun can restart")
    os._exit(INIT_FAILED_EXIT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def _collective(fn: Callable[[], T], doing: str) -> T:
    """Run one of itertrain's own collectives. Only torch runs inside (the objects sent are plain data),
    so whatever it raises is the group failing: a peer is gone or did not answer. A peer that left on
    its own error (a user's bug in training) published it before its sockets closed: that is the cause."""
    try:
        return fn()
    except RuntimeError as e:
        peer = failures.peer_outcome(rank(), world_size())
        if peer is not None:
            raise peer.error(f" (on rank {peer.rank})") from e
        raise lost_contact(e, doing, _io_timeout_s) from e


def training_failure(e: BaseException, doing: str, timeout_s: float, own: ItertrainError) -> ItertrainError:
    """What a failure inside training is, on this rank: a lost peer, a peer's own error (re-raised
    here from the (type, message, exit code) it published), or this rank's own error `own`.

    Decided by type (a DistError is a lost peer) and, for gloo's plain RuntimeError, by asking the
    other ranks (`failures.probe`), never by the error's text."""
    if is_comm_error(e):
        return lost_contact(e, doing, timeout_s)
    if not active():
        return own
    me = rank()
    answer = failures.probe(_probe_group)
    peer = failures.peer_outcome(me, world_size())  # a peer that failed first: its error is the cause
    if peer is not None:
        return peer.error(f" (on rank {peer.rank})")
    if answer == "gone":
        return lost_contact(e, doing, timeout_s)
    mine = failures.outcome_of(own, me)
    failures.publish(mine)
    return own


def barrier() -> None:
    if active():
        _collective(lambda: dist.barrier(group=_io_group), "waiting for every rank")


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _collective(lambda: dist.broadcast_object_list(box, src=0, group=_io_group), "waiting for rank 0")
    return box[0]  # type: ignore[return-value]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(out, obj, group=_io_group), "gathering from every rank")
    return out


def merge_gathered(part: dict) -> dict:
    """The union of every rank's dict, on every rank (e.g. results of work dealt across ranks)."""
    merged: dict = {}
    for p in all_gather(part):
        merged.update(p)
    return merged


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value`, on every rank: one small all-reduce on the CPU group
    (no GPU synchronisation)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_io_group), "agreeing with every rank")
    return int(t.item())


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result or its exception to every rank.

    Keeps ranks in step: if rank 0 fails, every rank raises the same error instead of hanging.
    Only (type name, message, exit code) crosses to the other ranks, never a pickled exception: they
    raise the ItertrainError of that name (or TrainingFailed naming the type) with rank 0's exit code.
    """
    result: tuple[str, Any]
    error: BaseException | None = None
    if is_main():
        try:
            result = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
            error, result = e, ("err", failures.outcome_of(e, 0))
    else:
        result = ("ok", None)
    result = broadcast(result)
    if error is not None:
        raise error
    if result[0] == "err":
        if result[1].type_name == "KeyboardInterrupt":
            raise KeyboardInterrupt
        raise result[1].error()
    return result[1]


def shutdown() -> None:
    global _io_group, _probe_group
    if active() and not failures.probe_left():
        dist.destroy_process_group()
    _io_group = _probe_group = None
