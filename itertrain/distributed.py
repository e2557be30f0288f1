"""The few collective operations the loop needs: rank 0 decides, everyone follows (SPEC §5)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init() -> None:
    """Join the torchrun process group early (before HF does), so the plan can be broadcast."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=int(os.environ.get("ITERTRAIN_DIST_TIMEOUT_MIN", "30"))))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_gathered(part: dict) -> dict:
    """The union of every rank's dict, on every rank (e.g. results of work dealt across ranks)."""
    merged: dict = {}
    for p in all_gather(part):
        merged.update(p)
    return merged


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result or its exception to every rank.

    Keeps ranks in step: if rank 0 fails, every rank raises the same error instead of hanging.
    """
    result: tuple[str, Any]
    if is_main():
        try:
            result = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank below
            result = ("err", e)
    else:
        result = ("ok", None)
    result = broadcast(result)
    if result[0] == "err":
        raise result[1]
    return result[1]


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
