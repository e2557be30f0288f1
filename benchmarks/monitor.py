"""The process monitor of the benchmark suite: runs a child, timestamps its output lines, watches its
output dir for checkpoint directories and manifests, and samples its peak RSS around each save."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO, Settings


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS high-water mark of a process (Linux >= 4.0, `echo 5 > clear_refs`)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class SaveWindow:
    """One checkpoint save seen from outside: the directory appears, HF's last file (trainer_state.json)
    appears, the commit marker (itertrain's manifest) appears."""

    name: str
    start: float
    hf_end: float | None = None
    end: float | None = None
    hwm_kb: int | None = None  # peak RSS between start and end (high-water mark reset at start)


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int | None
    wall: float  # launch -> exit (or kill)
    lines: list[tuple[float, str]]
    maxrss_kb: int  # ru_maxrss of the process (whole life)
    marks: dict[str, float] = field(default_factory=dict)  # first line matching each mark regex, s after launch
    mark_hwm_kb: dict[str, int] = field(default_factory=dict)  # VmHWM when the mark was seen
    windows: list[SaveWindow] = field(default_factory=list)
    killed: bool = False  # stopped on purpose (stop_at / stop_after_windows)
    timed_out: bool = False

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def run_monitored(
    cmd: list[str],
    *,
    env: dict[str, str],
    marks: dict[str, str | tuple[str, int]] | None = None,
    stop_at: str | None = None,
    stop_after_windows: int | None = None,
    watch_dir: Path | None = None,
    window_end: str | None = None,
    timeout: float = 1800,
    cwd: Path | None = None,
) -> RunResult:
    """Run `cmd` as its own process group and observe it from outside only.

    - every output line (stdout+stderr) is timestamped on arrival (the child runs unbuffered);
    - `marks`: name -> regex (or (regex, n): the n-th matching line); that line's arrival time and the
      process's VmHWM at that moment;
    - `stop_at`: a mark name; the process group is SIGKILLed as soon as that mark is seen;
    - `watch_dir`: polled every 10 ms for `checkpoint-*` directories: a save window opens when the
      directory appears (the peak-RSS mark is reset), `trainer_state.json` marks HF's last file and
      `window_end` (default trainer_state.json) closes it (the peak RSS of the window is read);
      `stop_after_windows`: SIGKILL the process group once that many windows have closed.
    Peak RSS of the whole life comes from wait4()'s rusage.
    """
    compiled: dict[str, tuple[re.Pattern, int]] = {}
    for k, v in (marks or {}).items():
        rx, nth = (v, 1) if isinstance(v, str) else v
        compiled[k] = (re.compile(rx), nth)
    counts = {k: 0 for k in compiled}
    result = RunResult(cmd, None, 0.0, [], 0)
    stop_event = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO,
                            start_new_session=True, bufsize=0)
    pid = proc.pid

    def reader() -> None:
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = proc.stdout.read(65536)
            if not chunk:
                break
            now = time.monotonic() - t0
            buf += chunk
            *complete, buf = re.split(rb"\r?\n|\r", buf)
            for raw in complete:
                line = raw.decode("utf-8", "replace")
                result.lines.append((now, line))
                for name, (rx, nth) in compiled.items():
                    if name in result.marks or not rx.search(line):
                        continue
                    counts[name] += 1
                    if counts[name] == nth:
                        result.marks[name] = now
                        hwm = _status_kb(pid, "VmHWM")
                        if hwm is not None:
                            result.mark_hwm_kb[name] = hwm
                        if name == stop_at:
                            stop_event.set()
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
        if buf:
            result.lines.append((time.monotonic() - t0, buf.decode("utf-8", "replace")))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    open_windows: dict[str, SaveWindow] = {}
    seen: set[str] = set()
    end_name = window_end or "trainer_state.json"
    status = 0
    rusage = None
    while True:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            break
        now = time.monotonic() - t0
        if now > timeout and not result.timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            result.timed_out = True
        if watch_dir is not None:
            try:
                names = [e.name for e in os.scandir(watch_dir) if e.name.startswith("checkpoint-")]
            except OSError:
                names = []
            for name in names:
                if name not in seen:
                    seen.add(name)
                    _reset_hwm(pid)
                    open_windows[name] = SaveWindow(name, now)
            for name, w in list(open_windows.items()):
                d = watch_dir / name
                if w.hf_end is None and (d / "trainer_state.json").exists():
                    w.hf_end = now
                if (d / end_name).exists():
                    w.end = now
                    w.hf_end = w.hf_end or now
                    w.hwm_kb = _status_kb(pid, "VmHWM")
                    result.windows.append(w)
                    del open_windows[name]
                    if stop_after_windows is not None and len(result.windows) >= stop_after_windows:
                        stop_event.set()
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        time.sleep(0.01)
    result.wall = time.monotonic() - t0
    th.join(timeout=10)
    result.killed = stop_event.is_set()
    result.returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = result.returncode
    result.maxrss_kb = rusage.ru_maxrss if rusage is not None else 0
    return result


def save_log(s: "Settings", name: str, r: RunResult) -> Path:
    """The run's timestamped output, marks and save windows, for looking into a number later."""
    d = s.work / "logs"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.log"
    with open(path, "w") as f:
        f.write(f"# cmd: {' '.join(r.cmd)}\n# exit {r.returncode} killed={r.killed} wall={r.wall:.3f}s "
                f"maxrss={r.maxrss_kb} kB\n# marks: {r.marks}\n# mark_hwm_kb: {r.mark_hwm_kb}\n")
        for w in r.windows:
            f.write(f"# save {w.name}: start {w.start:.3f} hf_end {w.hf_end} end {w.end} hwm {w.hwm_kb} kB\n")
        for t, line in r.lines:
            f.write(f"{t:9.3f} {line}\n")
    return path


class BenchError(RuntimeError):
    pass


def check_ok(r: RunResult, what: str) -> None:
    if r.timed_out or (r.returncode != 0 and not r.killed):
        raise BenchError(f"{what} failed (exit {r.returncode}): {' '.join(r.cmd)}\n{r.tail()}")
