"""Rank 0's console output, also written to `runs/train-<time>.log`.

Capture starts when the command starts (so the recovery report is in the log) and holds the text in
memory until the run is allowed to write: a refused launch leaves no log behind. Python-level tee of
sys.stdout and sys.stderr: what HF, tqdm and itertrain print goes through them.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TextIO


class _Sink:
    """Where captured text goes: memory until `open`, then the log file."""

    def __init__(self) -> None:
        self.buffer: io.StringIO | None = io.StringIO()
        self.file: TextIO | None = None

    def write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        elif self.buffer is not None:
            self.buffer.write(text)


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO, sink: _Sink):
        self.stream = stream
        self.sink = sink

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        try:
            self.sink.write(text)
        except OSError:  # a full disk must not break the console: the log is a copy
            self.sink.file = self.sink.buffer = None
        return n if n is not None else len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


_sink: _Sink | None = None


def capture() -> None:
    """Start copying sys.stdout and sys.stderr (rank 0; once per process)."""
    global _sink
    if _sink is not None:
        return
    _sink = _Sink()
    sys.stdout = _Tee(sys.stdout, _sink)  # type: ignore[assignment]
    sys.stderr = _Tee(sys.stderr, _sink)  # type: ignore[assignment]


def write_to(path: Path) -> Path | None:
    """From now on the copy goes to `path`, starting with what was printed so far."""
    if _sink is None or _sink.file is not None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    _sink.file = open(path, "a", encoding="utf-8")
    if _sink.buffer is not None:
        _sink.file.write(_sink.buffer.getvalue())
        _sink.buffer = None
    _sink.file.flush()
    return path


def prints_messages(every_node: bool = False) -> bool:
    """Whether this process prints the run's one-line messages: rank 0; with `every_node`, also each
    node's local rank 0 (so a node that stops because another one failed says why in its own log)."""
    if os.environ.get("RANK", "0") == "0":
        return True
    return every_node and os.environ.get("LOCAL_RANK", "0") == "0"


def emit(line: str) -> None:
    """Write one line to stderr, and to the log copy, from any thread and just before a hard exit:
    raw writes, never Python's buffered streams (another thread may hold their locks)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    try:
        os.write(2, data)
    except OSError:
        pass
    if _sink is not None and _sink.file is not None:
        try:
            os.write(_sink.file.fileno(), data)
        except (OSError, ValueError):
            pass
