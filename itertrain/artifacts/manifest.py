"""Manifests: the commit record of every artifact directory.

A directory is *committed* when its manifest exists and matches the bytes on disk. The manifest is
written last, by rank 0, after a barrier, through temp file + fsync + rename + fsync(dir).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import xxhash

from itertrain import faults
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import atomic_write_json, tree_files
from itertrain.layout import MANIFEST_NAME, Kind

SCHEMA_VERSION = 1
_CHUNK = 64 << 20  # hash a mapped file in 64 MiB slices
_KINDS = {k.value for k in Kind}  # the kinds a manifest may name; recovery/kinds.py's register adds one


def allow_kind(name: str, allowed: bool = True) -> None:
    """Let manifests name the artifact kind `name` (or, `allowed` False, no longer): its registration."""
    (_KINDS.add if allowed else _KINDS.discard)(name)


class ManifestError(Exception):
    """The manifest file exists but cannot be parsed, has the wrong schema, or is malformed."""


def entry_problem(rel: str) -> str | None:
    """Why `rel` cannot be a manifest entry: entries are relative paths inside their artifact."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or os.path.isabs(rel):
        return "is not a relative path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "leaves its artifact or is not normalized"
    if rel == MANIFEST_NAME:
        return "names the manifest itself"
    return None


@dataclass(frozen=True)
class FileEntry:
    size: int
    xxh3: str


@dataclass(frozen=True)
class Manifest:
    # kind, iteration, step and world_size come first in the file: discovery reads only them.
    kind: str
    iteration: int
    step: int
    world_size: int
    files: dict[str, FileEntry]
    lineage: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {k: asdict(v) for k, v in self.files.items()}
        return {"format": "itertrain-manifest", **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != "itertrain-manifest":
            raise ManifestError("not an itertrain manifest (missing format marker)")
        if d.get("schema") != SCHEMA_VERSION:
            raise ManifestError(f"unsupported manifest schema {d.get('schema')!r}")
        if d.get("kind") not in _KINDS:
            raise ManifestError(f"unknown artifact kind {d.get('kind')!r}")
        for rel in d.get("files") or {}:
            why = entry_problem(str(rel))
            if why:
                raise ManifestError(f"malformed manifest: entry {rel!r} {why}")
        try:
            files = {str(k): FileEntry(int(v["size"]), str(v["xxh3"])) for k, v in d["files"].items()}
            return cls(
                kind=d["kind"],
                iteration=int(d["iteration"]),
                step=int(d["step"]),
                files=files,
                lineage=dict(d.get("lineage") or {}),
                world_size=int(d.get("world_size", 1)),
                created=float(d.get("created", 0.0)),
                versions=dict(d.get("versions") or {}),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e


def library_versions() -> dict[str, str]:
    """Versions recorded in every manifest, so a reader can tell what wrote an artifact."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("itertrain", "torch", "transformers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def hash_file(path: Path, *, fsync: bool = False) -> FileEntry:
    """Size and xxh3-128 of a file, reading it once (optionally fsyncing it in the same open).

    The file is hashed in place through 64 MiB memory-mapped windows: no copy into a user buffer
    (faster than a read() loop), and each window is unmapped before the next, so the hashed pages
    never pile up in this process's memory."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for offset in range(0, size, _CHUNK):
            with mmap.mmap(fd, min(_CHUNK, size - offset), access=mmap.ACCESS_READ, offset=offset) as window:
                window.madvise(mmap.MADV_SEQUENTIAL)
                h.update(window)
        if fsync:
            os.fsync(fd)
    return FileEntry(size, h.hexdigest())


def build_manifest(
    directory: Path,
    *,
    kind: str,
    iteration: int,
    step: int,
    lineage: dict[str, Any] | None = None,
    world_size: int = 1,
    extra: dict[str, Any] | None = None,
    fsync: bool = True,
    written: Mapping[str, FileEntry] | None = None,
) -> Manifest:
    """Hash every file below `directory` (fsyncing each) and describe it as a manifest.

    `written`: the entries of files hashed (and fsynced) while they were written (`--async_save`);
    nothing is read back. The directory must then hold exactly those files with those sizes."""
    present = tree_files(directory, exclude={MANIFEST_NAME})
    if written is None:
        files = {rel: hash_file(directory / rel, fsync=fsync) for rel in present}
    else:
        sizes = {rel: os.stat(os.path.join(directory, rel)).st_size for rel in present}
        if sizes != {rel: e.size for rel, e in written.items()}:
            differ = sorted(set(sizes) ^ set(written) or {r for r in sizes if sizes[r] != written[r].size})
            raise ArtifactWriteError(f"could not commit {directory}: it does not hold the files that were written "
                                     f"({', '.join(differ[:4])})")
        files = {rel: written[rel] for rel in present}
    return Manifest(
        kind=kind,
        iteration=iteration,
        step=step,
        files=files,
        lineage=dict(lineage or {}),
        world_size=world_size,
        created=time.time(),
        versions=library_versions(),
        extra=dict(extra or {}),
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Commit `directory`: the manifest lands atomically and durably, last."""
    faults.point(f"manifest.{manifest.kind}.before")
    atomic_write_json(directory / MANIFEST_NAME, manifest.to_json(), fault_point=f"manifest.{manifest.kind}.write")
    faults.point(f"manifest.{manifest.kind}.after")


def commit_directory(directory: Path, **kwargs: Any) -> Manifest:
    """build_manifest + write_manifest."""
    manifest = build_manifest(directory, **kwargs)
    write_manifest(directory, manifest)
    return manifest


def recommit(directory: Path, **extra: Any) -> Manifest:
    """Commit a repaired artifact again: same kind, iteration, step and lineage, `extra` added."""
    old = read_manifest(directory)
    if old is None:
        raise ManifestError(f"{directory} has no manifest to renew")
    return commit_directory(directory, kind=old.kind, iteration=old.iteration, step=old.step, lineage=old.lineage,
                            world_size=old.world_size, extra={**old.extra, **extra})


def fingerprint(directory: Path) -> str | None:
    """A short identity of an artifact, for lineage checks: the xxh3 of its manifest's bytes; for a
    directory written by another tool, of its files' names, sizes and modification times (no data
    read). None when the directory is gone."""
    directory = Path(directory)
    try:
        return xxhash.xxh3_64_hexdigest((directory / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        pass
    except OSError:
        return None
    h = xxhash.xxh3_64()
    try:
        for rel in tree_files(directory):
            st = os.stat(directory / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return "files-" + h.hexdigest()


def read_manifest(directory: Path) -> Manifest | None:
    """The directory's manifest, None when it has none; ManifestError when it is unreadable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"cannot read {MANIFEST_NAME}: {e}") from e
    try:
        return Manifest.from_json(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class ManifestHeader:
    kind: str
    iteration: int
    step: int
    world_size: int


_HEADER_RE = re.compile(
    rb'^\{\s*"format": "itertrain-manifest",\s*"kind": "(\w+)",\s*"iteration": (-?\d+),\s*'
    rb'"step": (-?\d+),\s*"world_size": (\d+),'
)


def read_header(directory: str) -> ManifestHeader | None:
    """kind/iteration/step/world_size from the first bytes of a manifest (discovery's fast path:
    thousands of checkpoints are listed without parsing their file lists). None when there is no
    manifest; ManifestError when it cannot be read."""
    try:
        fd = os.open(os.path.join(directory, MANIFEST_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"cannot read {MANIFEST_NAME}: {e}") from e
    try:
        head = os.read(fd, 256)
    finally:
        os.close(fd)
    m = _HEADER_RE.match(head)
    if m is None:  # written by another version or damaged: the full parse says which
        full = read_manifest(Path(directory))
        assert full is not None
        return ManifestHeader(full.kind, full.iteration, full.step, full.world_size)
    return ManifestHeader(m.group(1).decode(), int(m.group(2)), int(m.group(3)), int(m.group(4)))


def check_sizes(directory: Path, manifest: Manifest) -> list[str]:
    """Metadata-only check: every listed file exists with the listed size. Returns problems."""
    problems = []
    base = str(directory)
    for rel, entry in manifest.files.items():
        try:
            size = os.stat(os.path.join(base, rel)).st_size
        except FileNotFoundError:
            problems.append(f"{rel} is listed in the manifest but missing")
            continue
        if size != entry.size:
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.size}")
    return problems


def verify_checksums(directory: Path, manifest: Manifest) -> list[str]:
    """Deep check: sizes and xxh3 of every listed file. Returns problems (empty when intact)."""
    problems = check_sizes(directory, manifest)
    if problems:
        return problems
    for rel, entry in manifest.files.items():
        got = hash_file(Path(directory) / rel)
        if got.xxh3 != entry.xxh3:
            problems.append(f"{rel} checksum mismatch (xxh3 {got.xxh3[:12]}…, manifest {entry.xxh3[:12]}…)")
    return problems
