"""Named fault points for the crash harness and the fault tests.

Production code calls `point("name")` at the moments that matter (inside a checkpoint save, inside
the manifest write, inside an iteration commit, between stages). Normally this does nothing. The
environment variable ITERTRAIN_FAULT arms points, comma-separated:

    NAME=ACTION[#HIT][@RANK]

ACTION is `kill` (SIGKILL the whole job at once: the torchrun agent and every rank, like a node dying),
`kill_self` (SIGKILL this process only), `enospc` / `eio` / `erofs` (raise that OSError, as a full
disk, a failing device or a file system remounted read-only would), `sleep:SECONDS` (hold this
moment open, for tests that act while it lasts), `hold:PATH` (hold it until the file PATH exists, at most
10 minutes: the test releases it when it is done). HIT (default 1) fires on the HIT-th time the point is reached in this
process; RANK (default any) restricts it to one rank. Example:
`ITERTRAIN_FAULT=checkpoint.optimizer=kill#2@1`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

ENV = "ITERTRAIN_FAULT"


@dataclass
class _Fault:
    name: str
    action: str
    hit: int
    rank: int | None


_counts: dict[str, int] = {}
_parsed: tuple[str, list[_Fault]] | None = None


def _faults() -> list[_Fault]:
    global _parsed
    spec = os.environ.get(ENV, "")
    if _parsed is not None and _parsed[0] == spec:
        return _parsed[1]
    faults: list[_Fault] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        rank = None
        hit = 1
        if "@" in action:
            action, _, r = action.partition("@")
            rank = int(r)
        if "#" in action:
            action, _, h = action.partition("#")
            hit = int(h)
        faults.append(_Fault(name.strip(), action.strip(), hit, rank))
    _parsed = (spec, faults)
    return faults


def armed(name: str) -> bool:
    """True when ITERTRAIN_FAULT names this point (for points that cost something to offer)."""
    return any(f.name == name for f in _faults())


def point(name: str) -> None:
    """Reach the named fault point; fire an armed fault if this is its moment."""
    faults = _faults()
    if not faults:
        return
    _counts[name] = _counts.get(name, 0) + 1
    rank = int(os.environ.get("RANK", "0"))
    for f in faults:
        if f.name != name or _counts[name] != f.hit or (f.rank is not None and f.rank != rank):
            continue
        if f.action == "kill":
            kill_job()
        elif f.action == "kill_self":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        elif f.action == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO), name)
        elif f.action == "erofs":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        elif f.action.startswith("sleep:"):
            time.sleep(float(f.action.split(":", 1)[1]))
        elif f.action.startswith("hold:"):
            release, deadline = f.action.split(":", 1)[1], time.monotonic() + 600
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            raise ValueError(f"{ENV}: unknown action {f.action!r} for point {name!r}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def kill_tree(root: int) -> None:
    """SIGKILL `root` and all its descendants (torchrun puts every rank in a session of its own, so
    killing one process group is not enough to take a whole job down)."""
    tree = _children()
    todo, pids = [root], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    me = os.getpid()
    for pid in pids:
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if me in pids:
        os.kill(me, signal.SIGKILL)


def kill_job() -> None:
    """SIGKILL the job this process belongs to: under torchrun the agent and every rank, otherwise
    this process's group."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ:
        kill_tree(os.getppid())
    os.killpg(os.getpgrp(), signal.SIGKILL)
