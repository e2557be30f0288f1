"""Checksum verification throughput: `itertrain.recovery.manifest.verify_checksums` on a committed
trainer checkpoint (>= 1 GB with the full model: weights + AdamW state) vs a raw sequential read of
the same files in the same order with the same 8 MiB `readinto` loop and no hashing: the physical
limit of reading those bytes. Both in this process, interleaved; with a warm page cache (the files
read once before) and, as root, a cold one (`sync; echo 3 > /proc/sys/vm/drop_caches` before each).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Figure, Settings, drop_caches, log, ratio_figure
from benchmarks.resume_latency import checkpoint_dir

_CHUNK = 8 << 20  # the same read size as itertrain.recovery.manifest.hash_file


def raw_read(directory: Path, names: list[str]) -> int:
    buf = bytearray(_CHUNK)
    total = 0
    for rel in names:
        with open(directory / rel, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return total


def timed_verify(directory: Path) -> float:
    from itertrain.artifacts.manifest import read_manifest, verify_checksums

    t = time.perf_counter()
    problems = verify_checksums(directory, read_manifest(directory))
    dt = time.perf_counter() - t
    if problems:
        raise RuntimeError(f"{directory} does not verify: {problems}")
    return dt


def timed_raw(directory: Path, names: list[str]) -> float:
    t = time.perf_counter()
    raw_read(directory, names)
    return time.perf_counter() - t


def collect(s: Settings, session: dict) -> dict:
    if "verify" in session:
        return session["verify"]
    from itertrain.artifacts.manifest import read_manifest

    d = checkpoint_dir(s)
    manifest = read_manifest(d)
    names = list(manifest.files)
    nbytes = sum(e.size for e in manifest.files.values())
    n = s.repeats if s.quick else max(s.repeats, 5)
    log(s, f"verify: {nbytes / 1e9:.2f} GB in {len(names)} files, {n} interleaved pairs per cache state")
    out: dict = {"bytes": nbytes, "files": len(names)}
    modes = ("warm", "cold") if s.cold else ("warm",)
    for mode in modes:
        it, raw = [], []
        if mode == "warm":
            timed_raw(d, names)
            timed_verify(d)
        for i in range(n):
            order = ("raw", "verify") if i % 2 == 0 else ("verify", "raw")
            for which in order:
                if mode == "cold" and not drop_caches():
                    raise RuntimeError("cannot drop the page cache (needs root)")
                dt = timed_raw(d, names) if which == "raw" else timed_verify(d)
                (raw if which == "raw" else it).append(dt)
        out[mode] = {"verify_s": it, "raw_s": raw}
        log(s, f"  {mode}: verify {[round(x, 3) for x in it]}, raw {[round(x, 3) for x in raw]}")
    session["verify"] = out
    return out


def figures(s: Settings, session: dict) -> list[Figure]:
    data = collect(s, session)
    gb = data["bytes"] / 1e9
    figs = []
    for mode in ("warm", "cold"):
        if mode not in data:
            continue
        it = [gb / t for t in data[mode]["verify_s"]]
        raw = [gb / t for t in data[mode]["raw_s"]]
        figs.append(ratio_figure(
            f"checksum verification throughput, {gb:.2f} GB checkpoint ({mode} cache)", it, raw,
            target=">= 0.8x", unit="GB/s", higher_is_better=True, limit=0.8,
            detail={"bytes": data["bytes"], "files": data["files"]},
        ))
    return figs
