"""What one rank tells the others when it fails, and how a rank tells a lost peer from its own error.

gloo reports a peer that died or went silent as a plain RuntimeError (torch 2.13, measured: a SIGKILLed
peer gives "Connection closed by peer", a silent one "Timed out waiting ...", neither a DistError), so
the exception alone cannot say whether a failure in training was this rank's own error (a collator that
raised) or a peer that is gone. Nothing here reads an error's text; the answer comes from outside it:

- `Outcome` (type name, one line, exit code) is all a rank ever tells another: published in the
  rendezvous store (torchrun's agent hosts it, so it outlives the rank), never a pickled exception.
- `probe` asks a CPU group of its own (no user code and no other collective of itertrain's runs on it,
  so it never pairs with a peer's commit barrier): a barrier that fails at once
  means a peer is gone; one that every rank joins means every rank failed; one still waiting after
  `PROBE_S` means the peers are alive and busy (in training), so the error is this rank's own.
  A peer that failed first published its outcome before it left: that is the error to report.
- A failure of the user's (by type: `NOT_RETRIED`) ends the launch: a worker that torchrun restarts
  after it stops at once with the same line instead of repeating a deterministic bug.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from itertrain import errors

PROBE_S = 5.0
# The failures that a restart repeats (the user's code, data or flags), by type.
NOT_RETRIED = (errors.TrainingFailed, errors.UsageError, errors.RecoveryRefused, errors.RewardFunctionError)

_store: Any = None  # the agent's store, unprefixed (None outside torchrun or before `attach`)
_prefix = ""  # this launch's keys: itertrain/<run id>/
_attempt = 0
_probe_left = False
_said = False
_said_lock = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """How one rank failed: all that crosses to another rank."""

    type_name: str
    message: str
    exit_code: int
    rank: int = 0
    retried: bool = True
    attempt: int = 0

    def error(self, note: str = "") -> errors.ItertrainError:
        """The error another rank raises for this outcome (its exit code and line, `note` added)."""
        cls = getattr(errors, self.type_name, None)
        if isinstance(cls, type) and issubclass(cls, errors.ItertrainError) and cls is not errors.ItertrainError:
            e = cls(self.message + note)
        else:
            e = errors.PeerFailed(f"{self.type_name}: {self.message}{note}")
        e.exit_code = self.exit_code
        return e


def outcome_of(e: BaseException, rank: int) -> Outcome:
    """`e` as an Outcome: an ItertrainError keeps its type name and code; anything else is exit 1."""
    # the whole line: a restarted attempt repeats it, remedy included (it is one line of the store)
    line = (str(e).strip().splitlines() or [type(e).__name__])[0][:4000]
    code = e.exit_code if isinstance(e, errors.ItertrainError) else 1
    return Outcome(type(e).__name__, line, code, rank, not isinstance(e, NOT_RETRIED), _attempt)


def attach(store: Any, run_id: str, attempt: int, agent_store: bool) -> None:
    """Remember the rendezvous store (under torchrun). Only the agent's store outlives an attempt;
    rank 0's own store (a launcher that does not share one) serves within the attempt only."""
    global _store, _prefix, _attempt
    _store, _prefix, _attempt = store, f"itertrain/{run_id or 'none'}/", attempt if agent_store else 0


def _key(attempt: int, what: str) -> str:
    return f"{_prefix}restart{attempt}/{what}"


def publish(outcome: Outcome) -> None:
    """Tell the other ranks (and a restarted attempt) how this rank failed; best effort."""
    if _store is None:
        return
    try:
        _store.set(_key(_attempt, f"failed/{outcome.rank}"), json.dumps(asdict(outcome)))
        if not outcome.retried:
            _store.set(_key(_attempt, "final"), json.dumps(asdict(outcome)))
    except (RuntimeError, OSError):  # the store is gone with its host: nothing to tell
        pass


def _read(key: str) -> Outcome | None:
    try:
        if not _store.check([key]):  # `get` would wait for the key
            return None
        return Outcome(**json.loads(_store.get(key)))
    except (RuntimeError, OSError, ValueError, TypeError):
        return None


def peer_outcome(me: int, world: int) -> Outcome | None:
    """The failure a peer published in this attempt (lowest rank first), or None."""
    if _store is None:
        return None
    for r in range(world):
        if r != me and (o := _read(_key(_attempt, f"failed/{r}"))) is not None:
            return o
    return None


def earlier_final() -> Outcome | None:
    """A failure of the user's that ended an earlier attempt of this launch (torchrun restarted us)."""
    if _store is None:
        return None
    for attempt in range(_attempt):  # the first: later attempts only repeated it
        if (o := _read(_key(attempt, "final"))) is not None:
            return o
    return None


def probe(group: Any) -> str:
    """Ask the peers on the probe's own CPU group (a barrier, bounded by PROBE_S): "gone" when it fails at
    once (a peer's sockets are closed), "joined" when it completes (the peers are here too), "busy"
    when it runs out of time (the peers are alive, inside a training collective)."""
    import torch.distributed as dist

    answer: list[str] = []

    def run() -> None:
        started = time.monotonic()
        try:
            group.set_timeout(timedelta(seconds=PROBE_S))
            dist.barrier(group=group)
            answer.append("joined")
        except Exception:  # noqa: BLE001 - whatever a failed collective raises: only how soon matters
            answer.append("gone" if time.monotonic() - started < PROBE_S / 2 else "busy")

    t = threading.Thread(target=run, name="itertrain-peer-probe", daemon=True)
    t.start()
    t.join(PROBE_S * 3)
    global _probe_left
    _probe_left = t.is_alive()
    return answer[0] if answer else "busy"


def new_command() -> None:
    """A command starts (once per process under torchrun; again when `itertrain.cli.main` is called from
    Python): its failure has not been said yet."""
    global _said
    with _said_lock:
        _said = False


def say_once() -> bool:
    """True the first time only: the main thread and the signal watcher may both end the process,
    and the run's failure is said once."""
    global _said
    with _said_lock:
        first, _said = not _said, True
    return first


def probe_left() -> bool:
    """A probe still waits in a collective: destroying the group would wait for it too."""
    return _probe_left


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))
