"""What the launcher (torchrun) tells a worker, and what a worker owes it.

- `restart_count`, `run_id`, `launcher_id`: torchrun's environment, read in one place.
- `die_with_launcher`: a worker exits when its torchrun agent dies. torchrun starts every worker in a
  session of its own, so nothing else would stop it: an orphan would go on training and hold the run
  lock, and a relaunch would be refused (exit 3) until it finished.
- `rendezvous_store`: the store the process group is created on, with a key space of its own per
  restart. torchrun's agent keeps its store across restarts, and `init_process_group` always uses the
  same keys, so a restarted rank could read a peer's address from the previous attempt (gloo then
  fails in connectFullMesh with "Connection refused", or waits forever).

Nothing here imports torch at module level: `die_with_launcher` runs first thing in a worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
store_client: tuple[Any, bool] | None = None  # (the rendezvous store, unprefixed; whether the agent hosts it)
POLL_S = 1.0  # the fallback watchdog's period


def under_torchrun(env: Any = None) -> bool:
    env = os.environ if env is None else env
    return "TORCHELASTIC_RESTART_COUNT" in env or "TORCHELASTIC_RUN_ID" in env


def _int(name: str, env: Any) -> int:
    try:
        return int((os.environ if env is None else env).get(name, "0"))
    except ValueError:
        return 0


def restart_count(env: Any = None) -> int:
    """0 on the first attempt; N after torchrun restarted the worker group N times (--max-restarts)."""
    return _int("TORCHELASTIC_RESTART_COUNT", env)


def max_restarts(env: Any = None) -> int:
    return _int("TORCHELASTIC_MAX_RESTARTS", env)


def run_id(env: Any = None) -> str:
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_RUN_ID", "") or ""


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid, unique on a host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def local_peer_exited(env: Any = None) -> bool:
    """True when a worker of this node's torchrun agent has exited (fewer of the agent's children are
    alive than LOCAL_WORLD_SIZE): a SIGTERM now is the agent stopping the rest of the group, not a
    scheduler's preemption. False outside torchrun or when it cannot be told."""
    env = os.environ if env is None else env
    expected = _int("LOCAL_WORLD_SIZE", env)
    if not under_torchrun(env) or expected <= 1:
        return False
    agent, alive = os.getppid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        alive += int(parent) == agent and state != "Z"
    return alive < expected


def launcher_id(env: Any = None) -> str | None:
    """Who launched this worker, the same across torchrun's restarts of it: the rendezvous id when the
    user gave one (`--rdzv_id`; torchrun's default is "none"), else this host's agent process. None
    outside torchrun."""
    env = os.environ if env is None else env
    if not under_torchrun(env):
        return None
    rid = run_id(env)
    if rid and rid != "none":
        return f"rdzv:{rid}"
    ppid = os.getppid()
    return f"agent:{socket.gethostname()}:{ppid}:{_start_time(ppid)}"


def die_with_launcher(sig: int = signal.SIGKILL) -> None:
    """Make this worker exit when its torchrun agent dies (call first thing; Linux; no-op elsewhere).

    `prctl(PR_SET_PDEATHSIG)` has the kernel send `sig` when the parent's forking thread exits
    (torchrun forks workers from its main thread, which lives as long as the agent); a thread that
    polls getppid() covers other systems and a launcher that forks from a short-lived thread.
    SIGKILL by default: with no launcher nobody commits anything, and a kill can never leave
    half-written state that looks committed (every artifact is committed by a manifest written last).
    """
    if not under_torchrun():
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the poll below still works
    if parent == 1 or os.getppid() != parent:  # the agent died before prctl took effect
        os.kill(os.getpid(), sig)

    def poll() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)

    threading.Thread(target=poll, name="itertrain-launcher-watch", daemon=True).start()


def rendezvous_store(timeout: timedelta) -> Any:
    """The store to create the process group on, or None outside torchrun (env:// then does it).

    Under torchrun: a client of the store torchrun hosts (or, when torchrun does not share its store,
    the fresh one rank 0 hosts), with keys under a prefix of this attempt's own. With the agent's
    shared store the prefix includes the restart count, so every attempt meets only its own peers;
    a store that is new for every rendezvous round needs no count (and must not have one: an elastic
    membership change restarts healthy nodes without counting a restart)."""
    if not under_torchrun():
        return None
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=True,
                          wait_for_workers=False)
    global store_client
    store_client = (store, agent_store)
    attempt = f"restart{restart_count()}/" if agent_store else ""
    return dist.PrefixStore(f"itertrain/{run_id() or 'none'}/{attempt}", store)


def continues_earlier_attempt(record: dict | None, env: Any = None) -> bool:
    """True for a worker that torchrun restarted (--max-restarts) after an earlier attempt of the same
    launch got as far as recording itself in the experiment record (`itertrain.json`, written once
    the plan was final and the output dir prepared). Such a worker continues the job as
    `--resume_from auto --resume_from_iteration auto` would: the earlier attempt's commits are the plan
    it was following. An attempt that never got there changed nothing, so the command line as written
    still holds (and a refusal, say of a silent restart, stays a refusal)."""
    me = launcher_id(env)
    if restart_count(env) < 1 or me is None or not record:
        return False
    return any(isinstance(launch, dict) and launch.get("launcher") == me for launch in record.get("launches", []))


def launch_summary(env: Any = None) -> dict[str, Any]:
    """What the experiment record keeps about the launcher of a launch."""
    if not under_torchrun(env):
        return {}
    return {"launcher": launcher_id(env), "restart": restart_count(env)}
