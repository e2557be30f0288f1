"""Writing checkpoint files while hashing them: the manifest's checksums come from the bytes as they
are written, so nothing is read back (the background writer of `--async_save`).

- `HashingFile`: a write-only file that feeds every byte it writes into xxh3-128 (the digest of the
  manifest's `FileEntry`). Writes go straight to the kernel; `close()` fsyncs on request.
- `safetensors_header`: the header safetensors 0.8 writes for a state dict (the same bytes as
  `safetensors.torch.save_file(..., metadata={"format": "pt"})`), so a shard can be written from
  host copies of the tensors, slice by slice.
- `torch_save_hashed`: `torch.save(obj, path)` byte for byte, hashed on the way to disk.

All of it releases the GIL where the time goes (`os.write`, xxh3 on large buffers, torch's C++ zip
writer), so the training thread keeps running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any, Callable

import torch
import xxhash

from itertrain.artifacts.manifest import FileEntry

WRITE_CHUNK = 32 << 20  # tensors are written in 32 MiB slices: a cancel is seen within one slice
PIPE_CHUNK = 1 << 20


class Abandoned(Exception):
    """The write was cancelled (the checkpoint directory stays without a manifest: torn)."""


class HashingFile:
    """A new file whose bytes are hashed as they are written: `close()` returns its FileEntry.

    `cancel`: once set, the next write raises Abandoned."""

    def __init__(self, path: str | os.PathLike[str], *, cancel: Cancel | None = None) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._hash = xxhash.xxh3_128()
        self._cancel = cancel
        self.size = 0

    def write(self, data: Any) -> int:
        if self._cancel is not None and self._cancel.is_set():
            raise Abandoned(f"the write of {self.path} was abandoned")
        view = memoryview(data).cast("B")
        self._hash.update(view)
        done, total = 0, len(view)
        while done < total:  # os.write may write less than asked
            done += os.write(self._fd, view[done:])
        self.size += total
        return total

    def flush(self) -> None:  # unbuffered: every write went to the kernel already
        pass

    def close(self, *, fsync: bool) -> FileEntry:
        try:
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return FileEntry(self.size, self._hash.hexdigest())

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, 0-d and empty included)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_tensor(f: HashingFile, t: torch.Tensor) -> None:
    view = tensor_bytes(t)
    for i in range(0, len(view), WRITE_CHUNK):
        f.write(view[i:i + WRITE_CHUNK])


# ---- safetensors, byte-identical to safetensors 0.8's serializer -------------------------------------
_DTYPE_CODE: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
for _name, _code in (("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e8m0fnu", "F8_E8M0"),
                     ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ")):
    if hasattr(torch, _name):
        _DTYPE_CODE[getattr(torch, _name)] = _code
# The declaration order of `enum Dtype` in safetensors/src/tensor.rs: tensors are laid out by dtype,
# descending in this order, then by name (`prepare()`).
_DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
                "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_DTYPE_RANK = {c: i for i, c in enumerate(_DTYPE_ORDER)}


def safetensors_supported(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_CODE


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """(length prefix + header bytes, tensor names in file order) of a safetensors file.

    `__metadata__` first, then the tensors in layout order, compact JSON (serde_json's), padded with
    spaces to a multiple of 8. Metadata must have at most one key: safetensors itself writes several
    keys in HashMap (random) order, which no one can reproduce."""
    if len(metadata) > 1:
        raise ValueError("safetensors orders several metadata keys at random; only one can be reproduced")
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_CODE:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors code")
    order = sorted(tensors, key=lambda n: (-_DTYPE_RANK[_DTYPE_CODE[tensors[n].dtype]], n))
    head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        head[name] = {"dtype": _DTYPE_CODE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


# ---- torch.save, hashed --------------------------------------------------------------------------------
def scratch_root() -> str:
    """Where private scratch files go: memory-backed when available."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


# The pump: a helper process that reads what torch.save writes into a pipe, hashes it and writes the
# file. It must be a process of its own: torch writes some records (data.pkl, the zip's end) holding
# the GIL, so a pump *thread* could not run while torch waits for room in the pipe (a deadlock).
# stdin: the data; the descriptor in argv[4]: control bytes from the parent (g: go on after "mid",
# e: the writer is done, drain and finish, x: discard the rest); stdout: "mid" after the first chunk
# (when asked), then "ok SIZE XXH3", "discarded" or "err ERRNO MESSAGE".
_PUMP = r"""
import os, select, signal, sys
sys.path.insert(0, sys.argv[5])  # started with -S -E (no site: 2-3x faster): xxhash's own directory
import xxhash
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
path, fsync, pause, ctl = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
h, size, err, discard, ended = xxhash.xxh3_128(), 0, None, False, False
try:
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
except OSError as e:
    err = e
buf = bytearray(1 << 20)
view = memoryview(buf)
def control():
    global ended, discard
    c = os.read(ctl, 1)
    if c in (b"", b"e") and not ended:
        ended = True
        os.set_blocking(0, False)
    elif c == b"x":
        discard = True
    return c
while True:
    if not ended and ctl in select.select([0, ctl], [], [])[0]:
        control()
        continue
    try:
        n = os.readv(0, [buf])
    except BlockingIOError:
        break
    if n == 0:
        break
    if err is None and not discard:
        try:
            h.update(view[:n])
            done = 0
            while done < n:
                done += os.write(out, view[done:n])
        except OSError as e:
            err = e
    first, size = size == 0, size + n
    if first and pause:
        print("mid", flush=True)
        while not discard and control() not in (b"g", b""):
            pass
if err is None and not discard:
    try:
        if fsync:
            os.fsync(out)
        os.close(out)
    except OSError as e:
        err = e
print(f"err {err.errno} {err.strerror}" if err else ("discarded" if discard else f"ok {size} {h.hexdigest()}"),
      flush=True)
"""


class Cancel:
    """A cancel flag with actions run when it is set (e.g. tell a helper process to stop writing)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._actions: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            actions, self._actions = self._actions, []
        for action in actions:
            try:
                action()
            except OSError:
                pass

    def is_set(self) -> bool:
        return self._event.is_set()

    def on_set(self, action: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._actions.append(action)
                return
        action()

    def discard(self, action: Callable[[], None]) -> None:
        with self._lock:
            if action in self._actions:
                self._actions.remove(action)


def torch_save_hashed(obj: Any, path: str, *, fsync: bool, cancel: Cancel | None = None,
                      mid_file: Callable[[], None] | None = None) -> FileEntry:
    """`torch.save(obj, path)`, the same bytes, hashed while written; nothing is read back.

    torch.save names the zip's folder after the file's stem only when it gets a path (a file object
    gets `archive/`), and it writes that path from C++. So it gets a path with the right name that is
    a symlink to `/proc/self/fd/W`, the write end of a pipe whose other end a pump process reads,
    hashes and writes to `path`. `mid_file` (a fault point) runs once the first chunk is in the file,
    with the pump held until it returns. Without /proc: a file object (loadable; folder `archive/`)."""
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        out = HashingFile(path, cancel=cancel)
        try:
            torch.save(obj, out)
            return out.close(fsync=fsync)
        except BaseException:
            out.abort()
            raise
    link_dir = tempfile.mkdtemp(prefix="itertrain-pipe-", dir=scratch_root())
    data_r, data_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(data_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_CHUNK)
    except OSError:
        pass
    try:
        pump = subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", _PUMP, path, "1" if fsync else "0", "1" if mid_file else "0", str(ctl_r),
             os.path.dirname(os.path.dirname(os.path.abspath(xxhash.__file__)))],
            stdin=data_r, stdout=subprocess.PIPE, pass_fds=(ctl_r,), text=True)
    except BaseException:
        for fd in (data_w, ctl_w):
            os.close(fd)
        shutil.rmtree(link_dir, ignore_errors=True)
        raise
    finally:
        os.close(data_r)
        os.close(ctl_r)
    lines: list[str] = []
    errors: list[BaseException] = []

    def send(byte: bytes) -> None:
        try:
            os.write(ctl_w, byte)
        except OSError:  # the pump is gone: its last line says why
            pass

    def read_status() -> None:
        assert pump.stdout is not None
        for line in pump.stdout:
            if line.strip() == "mid" and mid_file is not None:
                try:
                    mid_file()
                except BaseException as e:  # noqa: BLE001 - raised once torch.save returned
                    errors.append(e)
                send(b"g")
            else:
                lines.append(line.strip())

    stop = lambda: send(b"x")  # noqa: E731 - on cancel: the pump drains without writing
    reader = threading.Thread(target=read_status, name="itertrain-pump-status", daemon=True)
    reader.start()
    if cancel is not None:
        cancel.on_set(stop)
    try:
        link = os.path.join(link_dir, os.path.basename(path))
        os.symlink(f"/proc/{os.getpid()}/fd/{data_w}", link)
        torch.save(obj, link)
    except BaseException:
        send(b"x")
        raise
    finally:
        os.close(data_w)  # torch's own descriptor is closed: every byte is in the pipe or the file
        send(b"e")  # finish even if a forked child inherited a write end (no EOF would come)
        reader.join()
        pump.wait()
        os.close(ctl_w)
        if cancel is not None:
            cancel.discard(stop)
        shutil.rmtree(link_dir, ignore_errors=True)
    if errors:
        raise errors[0]
    if cancel is not None and cancel.is_set():
        raise Abandoned(f"the write of {path} was abandoned")
    status = lines[-1].split(" ", 2) if lines else ["err", "0", f"the pump exited with {pump.returncode}"]
    if status[0] == "ok":
        return FileEntry(int(status[1]), status[2])
    code = int(status[1]) if status[0] == "err" and status[1].isdigit() else 0
    raise OSError(code or None, status[-1], path)
