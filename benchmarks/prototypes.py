"""Prototypes of the product changes proposed in BENCHMARKS.md, measured without changing itertrain/:
each variant is patched in from outside (module attributes replaced for the duration of a timing).

    python benchmarks/prototypes.py [--work DIR] [--keep]

1. plan time on the 10k-checkpoint + 1k-model synthetic dir, cumulatively (for commit 5433584):
   (1) `check_sizes` on strings with `os.stat(dir_fd=...)`, (2) no per-file size check in discovery,
   (3) a cache of parsed manifests validated by one stat, (4) the checkpoint scan loop on strings;
   and for the header-only discovery (8c18176+): iteration models by header as well.
2. `verify_checksums` with several `hash_file` variants (the current one, the readinto loop of
   commit 5433584, mmap of the whole file, mmap in windows) vs a raw read: throughput and how much
   each raises the peak RSS, on the 1.23 GB checkpoint of the resume benchmark (made if missing,
   deleted unless --keep). Needs /proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import plan_time, resume_latency  # noqa: E402
from benchmarks.common import Settings, rmtree  # noqa: E402
from benchmarks.verify_throughput import raw_read  # noqa: E402


def _time_plan(D, root: Path, flags, label: str, n: int) -> None:
    """Median of n timed discover + decide runs on the 10k synthetic dir (after one warm-up, which
    also fills a cache variant), with the patched discovery module D."""
    from itertrain.experiment import load_record
    from itertrain.recovery.plan import decide

    D.discover(root, load_record(root))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        plan = decide(flags, D.discover(root, load_record(root)))
        ts.append(time.perf_counter() - t)
    assert plan.state_from == "checkpoint-100000", plan
    print(f"  {label:72s} {statistics.median(ts):.3f} s", flush=True)


def plan_prototypes(s: Settings) -> None:
    import itertrain.recovery.discover as D
    from itertrain.recovery import manifest as M
    from itertrain.recovery.plan import AUTO, RecoveryFlags

    root = plan_time.build(s.work, 10000, 1000)
    flags = RecoveryFlags(AUTO, AUTO, False, 1010, "previous")

    def bench(label: str) -> None:
        _time_plan(D, root, flags, label, n=5)

    if not all(hasattr(D, name) for name in ("check_sizes", "_committed_status", "read_manifest")):
        print("plan prototypes: not applicable, itertrain/recovery/discover.py has changed since they were "
              "written (commit 5433584); run benchmarks/run.py --only plan for the current figure")
        return
    orig = (D.check_sizes, D.read_manifest, D._scan_checkpoints)

    def check_sizes_fast(directory, manifest):
        problems = []
        fd = os.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for rel, entry in manifest.files.items():
                try:
                    size = os.stat(rel, dir_fd=fd).st_size
                except FileNotFoundError:
                    problems.append(f"{rel} is listed in the manifest but missing")
                    continue
                if size != entry.size:
                    problems.append(f"{rel} has {size} bytes, the manifest says {entry.size}")
        finally:
            os.close(fd)
        return problems

    cache: dict = {}

    def read_manifest_cached(directory):
        p = os.path.join(os.fspath(directory), M.MANIFEST_NAME)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        key = (p, st.st_mtime_ns, st.st_size, st.st_ino)
        if key not in cache:
            cache[key] = orig[1](directory)
        return cache[key]

    def scan_fast(root_, base, treat_as_foreign, adopted):
        out = []
        try:
            entries = list(os.scandir(base))
        except OSError:
            return out
        prefix = "" if os.fspath(base) == os.fspath(root_) else os.path.relpath(base, root_) + "/"
        for entry in entries:
            m = D.CHECKPOINT_RE.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            rel, step = prefix + entry.name, int(m.group(1))
            mtime = entry.stat(follow_symlinks=False).st_mtime
            status, manifest, problem, _ = D._committed_status(Path(entry.path), M.TRAINER_CHECKPOINT)
            if status == D.Status.TORN and (treat_as_foreign or rel in adopted):
                status, problem = D._foreign_status(Path(entry.path), M.TRAINER_CHECKPOINT)
                step = D._foreign_step(Path(entry.path), step)
                ckpt = D.TrainerCheckpoint(rel, step, -1, status, mtime, problem, None, foreign=True)
            else:
                ckpt = D.TrainerCheckpoint(rel, step, manifest.iteration if manifest else -1, status, mtime, problem,
                                           manifest.world_size if manifest else None)
            out.append((ckpt, manifest))
        return out

    print("plan time, 10,000 checkpoints + 1,000 iteration models (discover + decide, warm):")
    try:
        bench("current")
        D.check_sizes = check_sizes_fast
        bench("(1) check_sizes: os.stat(dir_fd) on strings")
        D.check_sizes = lambda d, m: []
        bench("(1)+(2) sizes checked only for the chosen candidates")
        D.read_manifest = read_manifest_cached
        bench("(1)+(2)+(3) parsed-manifest cache validated by one stat")
        D._scan_checkpoints = scan_fast
        bench("(1)+(2)+(3)+(4) scan loop on strings / DirEntry.stat")
        D.check_sizes = check_sizes_fast
        bench("(1)+(3)+(4) with sizes still checked for every artifact")
    finally:
        D.check_sizes, D.read_manifest, D._scan_checkpoints = orig


def plan_prototypes_headers(s: Settings) -> None:
    """For the header-only discovery (commit 8c18176 and later): iteration models read by header too,
    their missing config/tokenizer check left to the model the plan picks."""
    import itertrain.recovery.discover as D
    from itertrain.recovery import manifest as M
    from itertrain.recovery.plan import AUTO, RecoveryFlags

    if not all(hasattr(D, n) for n in ("_model_status", "read_header")):
        print("header plan prototypes: not applicable to this version of itertrain/recovery/discover.py")
        return
    root = plan_time.build(s.work, 10000, 1000)
    flags = RecoveryFlags(AUTO, AUTO, False, 1010, "previous")

    def bench(label: str) -> None:
        _time_plan(D, root, flags, label, n=7)

    def model_status_by_header(directory):
        try:
            header = D.read_header(str(directory))
        except M.ManifestError as e:
            return D.Status.CORRUPT, None, str(e), ()
        if header is None:
            return D.Status.TORN, None, "no manifest (the save never completed)", ()
        if header.kind != M.ITERATION_MODEL:
            return D.Status.CORRUPT, header, f"manifest says kind {header.kind!r}", ()
        return D.Status.COMMITTED, header, None, ()  # missing aux files: checked for the chosen model only

    orig = D._model_status
    print("plan time, 10,000 checkpoints + 1,000 iteration models (discover + decide, warm):")
    try:
        bench("current")
        D._model_status = model_status_by_header
        bench("iteration models by header, aux-file check only for the chosen model")
    finally:
        D._model_status = orig


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def verify_prototypes(s: Settings, keep: bool) -> None:
    """Throughput and peak-RSS growth of ways to hash the checkpoint, all through `verify_checksums`."""
    import xxhash

    from itertrain.recovery import manifest as M

    d = resume_latency.checkpoint_dir(s)
    man = M.read_manifest(d)
    gb = sum(e.size for e in man.files.values()) / 1e9
    names = list(man.files)

    def readinto_8m(path, *, fsync=False):  # hash_file as of commit 5433584
        h, buf = xxhash.xxh3_128(), bytearray(8 << 20)
        view, size = memoryview(buf), 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
            if fsync:
                os.fsync(f.fileno())
        return M.FileEntry(size, h.hexdigest())

    def mmap_whole(path, *, fsync=False):  # map the whole file (peak RSS grows by the file size)
        h = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    m.madvise(mmap.MADV_SEQUENTIAL)
                    h.update(m)
            if fsync:
                os.fsync(f.fileno())
        return M.FileEntry(size, h.hexdigest())

    def mmap_windows(window):  # map and unmap one window at a time (peak RSS grows by one window)
        def hash_file(path, *, fsync=False):
            h = xxhash.xxh3_128()
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                for off in range(0, size, window):
                    with mmap.mmap(f.fileno(), min(window, size - off), offset=off, access=mmap.ACCESS_READ) as m:
                        h.update(m)
                if fsync:
                    os.fsync(f.fileno())
            return M.FileEntry(size, h.hexdigest())
        return hash_file

    variants = [("current hash_file", M.hash_file), ("readinto 8 MiB (5433584)", readinto_8m),
                ("mmap whole file", mmap_whole), ("mmap 64 MiB windows", mmap_windows(64 << 20)),
                ("mmap 16 MiB windows", mmap_windows(16 << 20))]
    orig = M.hash_file
    times: dict[str, list[float]] = {"raw read 8 MiB": [], **{k: [] for k, _ in variants}}
    peak: dict[str, int] = {k: 0 for k in times}
    raw_read(d, names)
    try:
        for _ in range(7):
            for label in times:
                _reset_hwm()
                base = _hwm_kb()
                t = time.perf_counter()
                if label.startswith("raw"):
                    raw_read(d, names)
                else:
                    M.hash_file = dict(variants)[label]
                    assert not M.verify_checksums(d, man)
                times[label].append(time.perf_counter() - t)
                peak[label] = max(peak[label], _hwm_kb() - base)
    finally:
        M.hash_file = orig
        if not keep:
            rmtree(s.work / "resume")
    raw = gb / statistics.median(times["raw read 8 MiB"])
    print(f"checksum verification of {gb:.2f} GB (freshly written checkpoint), warm cache, medians of 7:")
    for label, ts in times.items():
        thr = gb / statistics.median(ts)
        print(f"  {label:28s} {thr:6.2f} GB/s  {thr / raw:.2f}x the raw read   peak RSS +{peak[label] // 1024} MiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the 1.2 GB checkpoint")
    ns = p.parse_args()
    s = Settings.make(False, None, ns.work, False, False)
    plan_prototypes(s)
    plan_prototypes_headers(s)
    verify_prototypes(s, ns.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
