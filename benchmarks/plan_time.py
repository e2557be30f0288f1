"""Plan time: `discover()` + `decide()` (what `itertrain status` does before the deep verification)
on synthetic output dirs with 100 / 1,000 / 10,000 trainer checkpoints and 10 / 100 / 1,000
iteration models.

Every artifact directory holds a manifest made by `Manifest(...).to_json()` (written as
`atomic_write_json` writes it) listing the files a real one lists, with realistic sizes. The
listed files exist as *sparse* files of exactly those sizes (no disk space, no data), so the
metadata-only size check of discovery passes and every artifact is committed. The iteration models
are iter_0 .. iter_{M-1}; the checkpoints belong to iteration M (the one in progress), so the plan
is "full restore of the newest checkpoint" and nothing is stale.

Timed in this process (the synthetic dirs are cached under the work dir): warm (metadata in the
kernel's caches, the usual case for a relaunch) as the figure; cold (page cache dropped) as info.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from benchmarks.common import Figure, Settings, drop_caches, log, median, spread

CKPT_FILES = {
    "config.json": 717, "generation_config.json": 216, "model.safetensors": 411_496_528,
    "optimizer.pt": 823_037_387, "rng_state.pth": 14_645, "scheduler.pt": 1_465,
    "trainer_state.json": 1_030, "training_args.bin": 5_969,
}
MODEL_FILES = {
    "config.json": 717, "generation_config.json": 216, "model.safetensors": 411_496_528,
    "tokenizer.json": 2_873, "tokenizer_config.json": 246,
}
SAVE_STEPS = 10


def _write_artifact(directory: Path, files: dict[str, int], manifest_json: dict) -> None:
    directory.mkdir(parents=True)
    for name, size in files.items():
        with open(directory / name, "wb") as f:
            f.truncate(size)  # sparse: the right st_size, no blocks
    (directory / "itertrain.manifest.json").write_text(json.dumps(manifest_json, indent=2) + "\n")


def _format_key() -> str:
    """A fingerprint of how `Manifest.to_json()` lays a manifest out (field order, schema): cached
    synthetic dirs are rebuilt when the product changes its manifest format."""
    import hashlib

    from itertrain.artifacts.manifest import TRAINER_CHECKPOINT, FileEntry, Manifest

    sample = Manifest(kind=TRAINER_CHECKPOINT, iteration=0, step=0, files={"a": FileEntry(0, "0")}, world_size=1)
    return hashlib.sha1(json.dumps(sample.to_json(), indent=2).encode()).hexdigest()[:8]


def build(root: Path, n_ckpt: int, n_models: int) -> Path:
    """The synthetic output dir (cached; a `.complete` marker says it is whole)."""
    from itertrain.artifacts.manifest import (
        ITERATION_MODEL,
        TRAINER_CHECKPOINT,
        FileEntry,
        Manifest,
        library_versions,
    )

    out = root / "plan" / f"c{n_ckpt}-m{n_models}-{_format_key()}"
    if (out / ".complete").exists():
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(n_ckpt)
    versions = library_versions()
    now = time.time()

    def entries(files: dict[str, int]) -> dict[str, FileEntry]:
        return {name: FileEntry(size, f"{rng.getrandbits(128):032x}") for name, size in files.items()}

    record = {"schema": 1, "experiment_id": f"{rng.getrandbits(128):032x}", "created": "2025-01-01T00:00:00+0000",
              "arguments": {"model_name": "/models/base", "strategy": "sft", "num_iterations": n_models + 10,
                            "iteration_init": "previous", "save_steps": SAVE_STEPS},
              "adopted": [], "launches": []}
    (out / "itertrain.json").write_text(json.dumps(record, indent=2) + "\n")
    prev_id = "base"
    for k in range(n_models):
        m = Manifest(kind=ITERATION_MODEL, iteration=k, step=1000, files=entries(MODEL_FILES),
                     lineage={"weights_from": f"iter_{k - 1}" if k else "base", "weights_id": prev_id,
                              "state_from": None, "state_scope": "none", "experiment_id": record["experiment_id"]},
                     world_size=1, created=now - (n_models - k) * 3600, versions=versions,
                     extra={"metrics": {"iteration": k, "train_loss": 1.0 / (k + 1), "steps": 1000,
                                        "wall_time_s": 3600.0}})
        _write_artifact(out / f"iter_{k}", MODEL_FILES, m.to_json())
        prev_id = f"{rng.getrandbits(64):016x}"
    for i in range(1, n_ckpt + 1):
        step = i * SAVE_STEPS
        m = Manifest(kind=TRAINER_CHECKPOINT, iteration=n_models, step=step, files=entries(CKPT_FILES),
                     lineage={"weights_from": f"iter_{n_models - 1}" if n_models else "base", "weights_id": prev_id,
                              "state_from": None, "state_scope": "none", "experiment_id": record["experiment_id"]},
                     world_size=1, created=now - (n_ckpt - i) * 60, versions=versions)
        _write_artifact(out / f"checkpoint-{step}", CKPT_FILES, m.to_json())
    (out / ".complete").write_text("")
    return out


def timed_plan(root: Path, n_models: int) -> tuple[float, float, object]:
    """(discover seconds incl. reading itertrain.json, decide seconds, plan)."""
    from itertrain.experiment import load_record
    from itertrain.recovery.discover import discover
    from itertrain.recovery.plan import AUTO, RecoveryFlags, decide

    flags = RecoveryFlags(AUTO, AUTO, False, n_models + 10, "previous")
    t0 = time.perf_counter()
    inv = discover(root, load_record(root))
    t1 = time.perf_counter()
    plan = decide(flags, inv)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, plan


def collect(s: Settings, session: dict) -> dict:
    if "plan" in session:
        return session["plan"]
    n = max(s.repeats, 5)
    results = {}
    for n_ckpt, n_models in s.plan_sizes:
        t = time.perf_counter()
        root = build(s.work, n_ckpt, n_models)
        built = time.perf_counter() - t
        timed_plan(root, n_models)  # warm the metadata caches
        warm = [timed_plan(root, n_models) for _ in range(n)]
        plan = warm[-1][2]
        expected = f"checkpoint-{n_ckpt * SAVE_STEPS}"
        if getattr(plan, "state_from", None) != expected:
            raise RuntimeError(f"unexpected plan on the synthetic dir: {plan}")
        cold = []
        if s.cold:
            for _ in range(1 if s.quick else min(n, 3)):
                if not drop_caches():
                    break
                cold.append(timed_plan(root, n_models))
        results[(n_ckpt, n_models)] = {"warm": [(a, b) for a, b, _ in warm], "cold": [(a, b) for a, b, _ in cold]}
        log(s, f"plan {n_ckpt} ckpts + {n_models} models (built in {built:.1f}s): "
               f"warm {median([a + b for a, b, _ in warm]):.4f}s, cold {[round(a + b, 3) for a, b, _ in cold]}")
    session["plan"] = results
    return results


def figures(s: Settings, session: dict) -> list[Figure]:
    results = collect(s, session)
    figs = []
    prev = None
    for (n_ckpt, n_models), r in results.items():
        total = [a + b for a, b in r["warm"]]
        t = median(total)
        growth = (t / prev[1]) / ((n_ckpt + n_models) / (prev[0])) if prev else None  # 1.0 = exactly linear
        detail = {
            "discover_s": round(median([a for a, _ in r["warm"]]), 5),
            "decide_s": round(median([b for _, b in r["warm"]]), 5),
            "range_s": spread(total),
            "per_artifact_us": round(t / (n_ckpt + n_models) * 1e6, 2),
            "growth_vs_linear": round(growth, 3) if growth else None,
        }
        if r["cold"]:
            detail["cold_total_s"] = round(median([a + b for a, b in r["cold"]]), 4)
            detail["cold_discover_s"] = round(median([a for a, _ in r["cold"]]), 4)
        # The target is stated for 10k checkpoints + 1k models; smaller sizes show the scaling.
        # "Linear": the growth from the previous size is within 1.25x of proportional.
        is_target = n_ckpt >= 10000
        met = (t < 0.2 and (growth is None or growth <= 1.25)) if is_target else None
        figs.append(Figure(f"plan time (discover + decide), {n_ckpt:,} checkpoints + {n_models:,} iteration models",
                           t, None, None, "< 0.2 s, linear" if is_target else "(scaling)", met, len(total), "s",
                           detail))
        prev = (n_ckpt + n_models, t)
    return figs
