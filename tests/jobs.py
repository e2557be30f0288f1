"""A live torchrun job for tests and measurements: start it, read its output as it comes, find its
agent and worker processes, signal them, wait for it to end. Used by the preemption, restart and
multi-node tests and by benchmarks/preemption.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`: tells a process from a later one that reuses its pid."""
    st = _stat(pid)
    return st[19] if st else None


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and int(st[1]) == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def torchrun_cmd(args: list[str], *, nproc: int = 2, port: int, extra: list[str] | None = None) -> list[str]:
    return [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", *(extra or []),
            str(REPO / "train_iterative.py"), *args]


class Job:
    """One launched process tree (a torchrun agent and its workers), its output read line by line."""

    def __init__(self, cmd: list[str], env: dict[str, str], *, cwd: Path = REPO, log: Path | None = None):
        self.cmd = cmd
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._log = open(log, "w") if log else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd, start_new_session=True, bufsize=1)
        self.seen: dict[int, str | None] = {self.proc.pid: start_time(self.proc.pid)}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()
            if self._log:
                self._log.write(line)
                self._log.flush()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(line for _, line in self.lines)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for _, line in self.lines if rx.search(line))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 300) -> float:
        """Block until `pattern` has appeared `count` times; returns when (monotonic). Fails if the job
        ends first or the timeout passes."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [t for t, line in self.lines if rx.search(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"job ended (rc {self.proc.returncode}) before {pattern!r} x{count}:\n"
                                         + self.output[-4000:])
                if time.monotonic() > deadline:
                    raise AssertionError(f"{pattern!r} x{count} not seen in {timeout}s:\n" + self.output[-4000:])
                self._cond.wait(0.5)

    def workers(self) -> dict[int, int]:
        """rank -> pid of the live worker processes (python processes whose environment has a RANK)."""
        out = {}
        for pid in descendants(self.proc.pid):
            env = env_of(pid)
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and alive(pid):
                out[int(env["RANK"])] = pid
        for pid in out.values():
            self.seen.setdefault(pid, start_time(pid))
        return out

    def ours(self) -> list[int]:
        """Every live process this job started that we saw (the same process, not a reused pid)."""
        for pid in descendants(self.proc.pid):
            self.seen.setdefault(pid, start_time(pid))
        return [pid for pid, t in self.seen.items() if alive(pid) and start_time(pid) == t]

    def signal_agent(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def signal_rank(self, rank: int, sig: int) -> int:
        pid = self.workers()[rank]
        os.kill(pid, sig)
        return pid

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not end in {timeout}s:\n" + self.output[-4000:])
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """SIGKILL the agent and every process it started (by pid, never by name)."""
        for pid in self.ours():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None or self.ours():
            self.kill()
        if self._log:
            self._log.close()
