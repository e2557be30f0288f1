"""Every rank must see the same output directory: checkpoints are written by every rank
(RNG states, shards) and committed by rank 0, so a node-local directory would split them between
nodes and commit checkpoints that are incomplete everywhere.

Rank 0 writes a check file with a fresh random name and content; the broadcast that follows is the
barrier; every rank reads that exact name; the verdicts are gathered. A fresh name means no node can
hold a cached "no such file" for it, and NFS's close-to-open consistency makes rank 0's closed file
visible to a later open. A short retry covers slower file systems (FUSE object stores). The check file
is removed, and so is the directory when the check created it: a refused launch changes nothing.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from itertrain import distributed
from itertrain.errors import UsageError
from itertrain.fsutil import fsync_dir
from itertrain.lock import READ_ONLY_ERRNOS

CHECK_PREFIX = ".itertrain-samedir-"
RETRIES = 5
RETRY_S = 0.5


def _write_check(root: Path) -> tuple[str, str, bool]:
    """(name, content, created the directory) of rank 0's check file."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{CHECK_PREFIX}{uuid.uuid4().hex}"
    content = f"{uuid.uuid4().hex} {socket.gethostname()} {os.getpid()}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / name)  # the name appears only with its whole content
    fsync_dir(root)
    return name, content, created


def _look(root: Path, name: str, content: str) -> str | None:
    """Why this rank does not see rank 0's check file (None when it does)."""
    if not root.is_dir():
        return "the directory does not exist there"
    got: str | None = None
    for attempt in range(RETRIES):
        try:
            got = (root / name).read_text()
        except FileNotFoundError:
            got = None
        except OSError as e:
            return f"the check file cannot be read ({e.strerror})"
        if got == content:
            return None
        if attempt + 1 < RETRIES:
            time.sleep(RETRY_S)
    return "it is a different directory" if got is None else "the check file there has other content"


def check_same_output_dir(root: Path) -> None:
    """Every rank: raise UsageError (exit 2) on every rank unless all see rank 0's `root`."""
    if distributed.world_size() <= 1:
        return
    root = Path(root)
    outcome: tuple = ("err", "")
    if distributed.is_main():
        try:
            outcome = ("ok", *_write_check(root))
        except OSError as e:
            # read-only: nothing will be written there (RunLock says so; a finished experiment is reported)
            ro = e.errno in READ_ONLY_ERRNOS and root.is_dir()
            outcome = ("ro", "") if ro else ("err", f"--output_dir {root} cannot be written ({e.strerror or e})")
    outcome = distributed.broadcast(outcome)  # the barrier: the check file is on disk before anyone looks
    if outcome[0] == "ro":
        return
    if outcome[0] == "err":
        raise UsageError(outcome[1])
    _, name, content, created = outcome
    why = None if distributed.is_main() else _look(root, name, content)
    verdicts = distributed.all_gather((distributed.rank(), socket.gethostname(), why))
    if distributed.is_main():
        try:
            (root / name).unlink()
            if created:
                root.rmdir()
        except OSError:
            pass
    bad = [(r, host, w) for r, host, w in verdicts if w is not None]
    if bad:
        where = "; ".join(f"rank {r} on {host}: {w}" for r, host, w in bad[:4]) + ("; …" if len(bad) > 4 else "")
        raise UsageError(
            f"--output_dir {root} is not the same directory on every node: rank 0 (on {verdicts[0][1]}) wrote a check "
            f"file there that {len(bad)} of {len(verdicts)} ranks cannot see ({where}). The output dir must be on a "
            "file system shared by every node (a network or cluster file system, mounted at the same path); a "
            "node-local directory would split checkpoints between nodes"
        )
