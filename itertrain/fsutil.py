"""Durable, careful file operations: atomic writes, fsync, and deletion that stays inside output_dir."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from itertrain.errors import ArtifactWriteError
from itertrain import faults


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, fault_point: str | None = None) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the complete new one.

    temp file in the same directory -> fsync -> rename -> fsync(directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if fault_point:
                faults.point(fault_point)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise ArtifactWriteError(describe_write_error(e, path)) from e


def atomic_write_json(path: Path, obj: Any, *, fault_point: str | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), fault_point=fault_point)


def describe_write_error(e: OSError, path: Path) -> str:
    """One readable sentence for a failed write."""
    if e.errno == errno.ENOSPC:
        what = "the disk is full (ENOSPC)"
    elif e.errno == errno.EIO:
        what = "an I/O error occurred (EIO)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = f"the location is not writable ({errno.errorcode.get(e.errno, e.errno)})"
    elif e.errno == errno.EDQUOT:
        what = "the disk quota is exhausted (EDQUOT)"
    elif e.errno == errno.EFBIG:
        limit = _file_size_limit()
        what = ("a file reached the file size limit of this process (EFBIG; ulimit -f allows "
                f"{limit} bytes)" if limit is not None else "a file is too large for the file system (EFBIG)")
    else:
        what = f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0, e.errno)})"
    where = f" ({e.filename})" if e.filename and str(e.filename) not in str(path) else ""
    return f"could not write {path}{where}: {what}"


# How torch and safetensors report a failed write: no OSError, the errno only in the text (if at all).
_LIBRARY_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed",
                         "No space left on device", "Input/output error", "Read-only file system",
                         "File too large", "Disk quota exceeded")
_ERRNO_TEXTS = {"No space left on device": errno.ENOSPC, "Input/output error": errno.EIO,
                "Read-only file system": errno.EROFS, "File too large": errno.EFBIG,
                "Disk quota exceeded": errno.EDQUOT}


def _free_bytes(path: Path) -> int | None:
    for p in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return None


def _file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE (`ulimit -f`) in bytes, None when unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _diagnose(path: Path) -> OSError | None:
    """The cause of a write that failed inside a library that gives no errno (torch's archive writer
    says only "unexpected pos" or "file write failed"), read from the state it left: a full disk, a
    read-only file system, a file at this process's size limit. None when none of these shows."""
    path = Path(path)
    free = _free_bytes(path)
    if free is not None and free < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None:
        try:
            if os.statvfs(existing).f_flag & os.ST_RDONLY:
                return OSError(errno.EROFS, os.strerror(errno.EROFS))
        except OSError:
            pass
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            return OSError(errno.EACCES, os.strerror(errno.EACCES))
    limit = _file_size_limit()
    if limit is not None and existing is not None:
        # The file that stopped growing at the limit is the one that failed: name it.
        files = [existing] if existing.is_file() else [existing / f for f in tree_files(existing)]
        full = next((f for f in files if _size(f) >= limit), None)
        if full is not None:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), full.name)
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def describe_library_write_error(e: BaseException, path: Path) -> str | None:
    """One readable sentence for a write that failed inside torch/safetensors/HF, or None when `e` is
    not a failed write. Their errors carry no errno: it is read from the text, or from the disk."""
    if isinstance(e, OSError) and e.errno is not None:
        return describe_write_error(e, path)
    text = str(e)
    if not any(marker in text for marker in _LIBRARY_WRITE_ERRORS):
        return None
    for marker, code in _ERRNO_TEXTS.items():
        if marker in text:
            return describe_write_error(OSError(code, os.strerror(code)), path)
    cause = _diagnose(path)
    if cause is not None:
        return describe_write_error(cause, path)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"could not write {path}: the write failed ({first[:160]})"


def is_inside(path: Path, root: Path) -> bool:
    """True when `path` lies strictly inside `root` without passing through a symlink."""
    root = Path(os.path.abspath(root))
    path = Path(os.path.abspath(path))
    if path == root or root not in path.parents:
        return False
    # Every component between root and path must be a real directory, and path itself not a link.
    # The root itself may be a link (output_dir on scratch storage); nothing below it may be.
    cur = path
    while cur != root:
        if cur.is_symlink():
            return False
        cur = cur.parent
    return True


def safe_rmtree(path: Path, root: Path) -> None:
    """Delete `path` only if it is a real directory inside `root` (never through a symlink).

    Symlinks inside the tree are unlinked, never followed.
    """
    path = Path(path)
    if not is_inside(path, root):
        raise ValueError(f"refusing to delete {path}: it is not a real directory inside {root}")
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"refusing to delete {path}: not a real directory")
    shutil.rmtree(path)


def safe_move(src: Path, dst: Path, root: Path) -> None:
    """Rename `src` to `dst`, both inside `root` (atomic on one file system)."""
    if not is_inside(src, root) or not is_inside(dst, root):
        raise ValueError(f"refusing to move {src} -> {dst}: outside {root}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def tree_files(root: Path, exclude: set[str] = frozenset()) -> list[str]:
    """Relative paths (posix) of all regular files below `root`, sorted, skipping names in `exclude`."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel in exclude or name.startswith(".") and ".tmp-" in name:
                continue
            out.append(rel.replace(os.sep, "/"))
    return out
