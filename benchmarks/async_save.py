"""`--async_save` vs plain HF Trainer's save, and vs the floor of any snapshot, in one invocation.

The same job (model, data, seed, batch, fp32, `--logging_steps 1`) as itertrain with `--async_save`
and as the plain-HF program (`hf_train.py`), interleaved (A-B / B-A): save every 5 steps for 30 steps
(6 saves of 1.23 GB on the full model). Besides, in a process of its own (`copy_floor.py`): one
in-memory copy of the same state (weights + AdamW moments), into a reused buffer and into freshly
allocated memory: the physical floor of any snapshot. The goal: loop time lost per save within 1.2x
of the reused-buffer copy.
Measured from outside (no hook in either program):
- `train()` time: HF's `train_runtime` plus, for itertrain, the wait in `on_train_end` for the last
  background write and commit (`train_overhead.train_time`);
- loop time lost per save: with one loss log per step, the time from the first to the last log minus
  (steps in between) x the plain step time (the median gap between two HF logs with no save between
  them, over every HF run of the case), divided by the saves in between. It counts everything the
  saves cost the loop: HF's synchronous write, or the snapshot, a wait for the previous writer and
  the slowdown of the steps that run beside the background writer (on this 2-core machine the writer
  competes with training for CPU and memory bandwidth). The part spent at the save step itself (the
  gap of the save step minus the plain step time) is in the detail;
- peak RSS of the whole process (wait4's ru_maxrss): `--async_save` holds one extra copy of weights
  and optimizer state in host memory while training.
(Resuming from an `--async_save` checkpoint is resuming from HF's own files: `--only resume`.)
"""

from __future__ import annotations

import json
import os
import subprocess

from benchmarks.common import (MANIFEST, PY, REPO, Figure, Settings, child_env, hf_cmd, itertrain_cmd, log, make_model,
                               median, ratio_figure, rmtree, scratch_job)
from benchmarks.monitor import RunResult, check_ok, run_monitored, save_log
from benchmarks.train_overhead import train_time

ASYNC = ("--async_save",)
VARIANTS = ("hf", "async")


def cases(s: Settings) -> dict[str, tuple[int, int]]:
    """name -> (max_steps, save_steps)."""
    if s.quick:
        return {"heavy": (20, 5)}
    return {"heavy": (30, 5)}


def _loss_times(r: RunResult) -> list[float]:
    return [t for t, line in r.lines if "'loss'" in line]


def _gaps(r: RunResult) -> list[float]:
    logs = _loss_times(r)
    return [b - a for a, b in zip(logs, logs[1:])]


def one_run(s: Settings, variant: str, case: str, tag: str, max_steps: int, save_steps: int) -> RunResult:
    # --save_total_limit 2 in both: the save-heavy case would otherwise keep 6 x 1.23 GB per run
    out, flags = scratch_job(s, f"async-{case}-{variant}-{tag}", max_steps=max_steps, save_steps=save_steps,
                             logging_steps=1, extra=("--save_total_limit", "2"))
    cmd = itertrain_cmd(flags) + list(ASYNC) if variant == "async" else hf_cmd(flags)
    r = run_monitored(cmd, env=child_env(), watch_dir=out, window_end=MANIFEST if variant == "async" else None)
    save_log(s, f"async-{case}-{variant}-{tag}", r)
    check_ok(r, f"{variant} training job ({case})")
    if len(_loss_times(r)) != max_steps:
        raise RuntimeError(f"{variant} ({case}): expected {max_steps} loss logs:\n{r.tail()}")
    rmtree(out)
    os.sync()  # what this run left dirty is written back before the next one starts
    return r


def collect(s: Settings, session: dict) -> dict[str, dict[str, list[RunResult]]]:
    if "async_runs" in session:
        return session["async_runs"]
    log(s, f"async save: model {s.model.key}, cases {cases(s)}, {s.repeats} interleaved pairs")
    for variant in VARIANTS:  # warm-up, not measured: page cache, bytecode
        one_run(s, variant, "warmup", "0", 2, 2)
    runs: dict[str, dict[str, list[RunResult]]] = {c: {v: [] for v in VARIANTS} for c in cases(s)}
    for case, (max_steps, save_steps) in cases(s).items():
        for i in range(s.repeats):
            for variant in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                r = one_run(s, variant, case, str(i), max_steps, save_steps)
                runs[case][variant].append(r)
                log(s, f"  {case} {variant:5s} #{i}: train() {train_time(r):.2f}s, wall {r.wall:.2f}s, "
                       f"peak RSS {r.maxrss_kb / 1024:.0f} MB")
    session["async_runs"] = runs
    return runs


def plain_step_s(hf_runs: list[RunResult], save_steps: int) -> float:
    """Median gap between two HF loss logs with no save between them (log k is step k; HF logs step S,
    then saves checkpoint-S, so the gap after log S holds that save)."""
    gaps = []
    for r in hf_runs:
        logs = _loss_times(r)
        gaps += [b - a for k, (a, b) in enumerate(zip(logs, logs[1:]), start=1) if k % save_steps]
    return median(gaps)


def lost_per_save(r: RunResult, save_steps: int, step_s: float) -> tuple[float, float]:
    """(loop time lost per save in total, the part at the save step itself), for the saves between the
    first and the last loss log."""
    logs = _loss_times(r)
    inside = [k for k in range(1, len(logs)) if k % save_steps == 0]
    if not inside:
        return float("nan"), float("nan")
    total = (logs[-1] - logs[0] - (len(logs) - 1) * step_s) / len(inside)
    at_step = median([logs[k] - logs[k - 1] - step_s for k in inside])  # gap after log k = logs[k] - logs[k-1]
    return total, at_step


def figures(s: Settings, session: dict) -> list[Figure]:
    runs = collect(s, session)
    figs: list[Figure] = []
    for case, (max_steps, save_steps) in cases(s).items():
        hf, asy = runs[case]["hf"], runs[case]["async"]
        step_s = plain_step_s(hf, save_steps)
        lost = {v: [lost_per_save(r, save_steps, step_s) for r in runs[case][v]] for v in VARIANTS}
        label = f"save every {save_steps} steps, {max_steps} steps"
        detail = {"model": s.model.key, "max_steps": max_steps, "save_steps": save_steps,
                  "plain_step_s_hf": round(step_s, 3),
                  "step_s_median_async": round(median([g for r in asy for g in _gaps(r)]), 3)}
        figs.append(ratio_figure(f"loop time lost per save, --async_save vs HF's save ({label})",
                                 [a for a, _ in lost["async"]], [a for a, _ in lost["hf"]],
                                 target="<= 0.15x", unit="s", limit=0.15, detail=detail))
        # The stall alone: HF's whole write, or the snapshot plus a wait for the previous writer.
        figs.append(ratio_figure(f"loop stall at the save step, --async_save vs HF's save ({label})",
                                 [b for _, b in lost["async"]], [b for _, b in lost["hf"]],
                                 target="(info)", unit="s"))
        figs.append(ratio_figure(f"training wall time (train()), --async_save vs plain HF ({label})",
                                 [train_time(r) for r in asy], [train_time(r) for r in hf],
                                 target="<= 0.90x" if case == "heavy" else "(info)", unit="s",
                                 limit=0.90 if case == "heavy" else None))
        figs.append(ratio_figure(f"peak RSS of the training job, --async_save vs plain HF ({label})",
                                 [r.maxrss_kb / 1024 for r in asy], [r.maxrss_kb / 1024 for r in hf],
                                 target="(report: ~1 + one state copy)", unit="MB"))
    floor = copy_floor(s)
    lost_async = [a for a, _ in [lost_per_save(r, 5, plain_step_s(runs["heavy"]["hf"], 5)) for r in runs["heavy"]["async"]]]
    figs.append(ratio_figure("in-memory copy of the checkpoint's state (the floor of any snapshot): reused buffer "
                             "vs freshly allocated", floor["reused_s"], floor["fresh_s"], target="(info)", unit="s",
                             paired=False, detail={"bytes": floor["bytes"]}))
    figs.append(ratio_figure("loop time lost per save with --async_save vs one in-memory copy into a reused buffer "
                             "(save every 5 steps)", lost_async, floor["reused_s"], target="<= 1.2x", unit="s",
                             limit=1.2, paired=False))
    return figs


def copy_floor(s: Settings) -> dict:
    """`copy_floor.py` on the benchmark's model, in a process of its own."""
    env = child_env(MALLOC_MMAP_THRESHOLD_="131072")  # fresh allocations are new mappings (see copy_floor.py)
    out = subprocess.run([PY, "-m", "benchmarks.copy_floor", str(make_model(s.model, s.work)), str(max(3, s.repeats))],
                         env=env, cwd=REPO, capture_output=True, text=True, check=True)
    floor = json.loads(out.stdout.strip().splitlines()[-1])
    log(s, f"  copy floor: {floor}")
    return floor
