"""Training overhead: the same job with itertrain vs plain HF Trainer, checkpointing every N steps.

Both run as subprocesses with the same model, data, seed, max_steps, save_steps, batch and dtype
(fp32); interleaved (order alternating A-B / B-A) so drift in the machine's load hits both.
Measured from outside:
- the figure: `train()`'s duration = HF's own `train_runtime` metric (printed by HF in both
  programs: the training loop including every checkpoint save and, for itertrain, every commit
  that runs in the `on_save` callback) + for itertrain the wait for the last background commit in
  `on_train_end`, which HF runs after computing train_runtime (see `train_time`);
- whole-process wall time, launch to exit (itertrain also evaluates and commits `iter_0`; the
  baseline program does the equivalent evaluation and `trainer.save_model`);
- per save, from polling the output dir every 10 ms: the checkpoint directory appears -> HF's last
  file (`trainer_state.json`) appears -> itertrain's manifest appears (the commit latency);
- per save, the training loop's loss: the gap between the loss logs around the save minus a normal
  gap between logs (HF logs step S, then saves checkpoint-S).
"""

from __future__ import annotations

import os
import re

from benchmarks.common import (MANIFEST, Figure, Settings, child_env, hf_cmd, itertrain_cmd, log, median, ratio_figure,
                               rmtree, scratch_job, spread)
from benchmarks.monitor import RunResult, check_ok, run_monitored, save_log

_RUNTIME_RE = re.compile(r"'train_runtime':\s*'?([0-9.]+)")


def train_runtime(r: RunResult) -> float:
    m = _RUNTIME_RE.search(r.text)
    if not m:
        raise RuntimeError(f"no train_runtime in the output of {' '.join(r.cmd)}:\n{r.tail()}")
    return float(m.group(1))


def train_time(r: RunResult) -> float:
    """`train()`'s duration: HF's train_runtime, plus what runs after HF computed it and before
    train() returns. HF computes train_runtime before `on_train_end`; itertrain's callback waits
    there for the last checkpoint's background commit (--async_commit), so for itertrain the time
    from the train_runtime line to its next line (`· stage: evaluate`, printed once train()
    returned) is added. The plain-HF program has nothing in `on_train_end`."""
    rt = train_runtime(r)
    for i, (t, line) in enumerate(r.lines):
        if _RUNTIME_RE.search(line):
            after = [t2 for t2, l2 in r.lines[i + 1:] if "stage: evaluate" in l2]
            return rt + (after[0] - t if after else 0.0)
    return rt


def _step_time(r: RunResult, logging_steps: int) -> float:
    """Median seconds per step between consecutive loss logs that have no save between them."""
    logs = [t for t, line in r.lines if "'loss'" in line]
    saves = [(w.start, w.end or w.start) for w in r.windows]
    gaps = []
    for a, b in zip(logs, logs[1:]):
        if not any(a <= s0 <= b for s0, _ in saves):
            gaps.append(b - a)
    return median(gaps) / logging_steps if gaps else float("nan")


def one_run(s: Settings, variant: str, tag: str, *, max_steps: int, save_steps: int) -> RunResult:
    out, flags = scratch_job(s, f"train-{variant}-{tag}", max_steps=max_steps, save_steps=save_steps,
                             logging_steps=s.logging_steps)
    cmd = itertrain_cmd(flags) if variant == "itertrain" else hf_cmd(flags)
    r = run_monitored_job(cmd, out, variant)
    save_log(s, f"train-{variant}-{tag}", r)
    check_ok(r, f"{variant} training job")
    rmtree(out)
    os.sync()  # write back (or drop) what this run left dirty before the next one starts
    return r


def run_monitored_job(cmd, out, variant) -> RunResult:
    return run_monitored(cmd, env=child_env(), watch_dir=out, window_end=MANIFEST if variant == "itertrain" else None,
                         marks={"first_step": r"'loss'"})


def collect(s: Settings, session: dict) -> dict[str, list[RunResult]]:
    if "train_runs" in session:
        return session["train_runs"]
    log(s, f"train overhead: model {s.model.key}, {s.max_steps} steps, save every {s.save_steps}, "
           f"{s.repeats} interleaved pairs")
    # Warm-up (not measured): model files in the page cache, Python bytecode compiled, for both.
    for variant in ("hf", "itertrain"):
        one_run(s, variant, "warmup", max_steps=2, save_steps=2)
    runs: dict[str, list[RunResult]] = {"itertrain": [], "hf": []}
    for i in range(s.repeats):
        order = ("hf", "itertrain") if i % 2 == 0 else ("itertrain", "hf")
        for variant in order:
            r = one_run(s, variant, str(i), max_steps=s.max_steps, save_steps=s.save_steps)
            runs[variant].append(r)
            log(s, f"  {variant:9s} #{i}: train() {train_time(r):.2f}s (train_runtime {train_runtime(r):.2f}s), "
                   f"wall {r.wall:.2f}s, "
                   f"saves {[round((w.end or 0) - w.start, 2) for w in r.windows]}")
    session["train_runs"] = runs
    return runs


def _blocked_per_save(r: RunResult) -> list[float]:
    """Seconds the training loop lost to each save: HF logs step S, then saves; the gap to the next
    log (S + logging_steps) minus the median gap without a save in it. Saves with no later log (the
    final one) are skipped."""
    logs = [t for t, line in r.lines if "'loss'" in line]
    starts = [w.start for w in r.windows]
    plain = [b - a for a, b in zip(logs, logs[1:]) if not any(a <= t0 <= b for t0 in starts)]
    if not plain:
        return []
    base = median(plain)
    out = []
    for t0 in starts:
        before = [t for t in logs if t <= t0]
        after = [t for t in logs if t > t0]
        if before and after:
            out.append(after[0] - before[-1] - base)
    return out


def figures(s: Settings, session: dict) -> list[Figure]:
    runs = collect(s, session)
    it, hf = runs["itertrain"], runs["hf"]
    rt_it, rt_hf = [train_time(r) for r in it], [train_time(r) for r in hf]
    # Per save, from outside: HF's part (dir appears -> trainer_state.json) and itertrain's commit
    # (trainer_state.json -> manifest). Medians over every save of every run.
    hf_save = [w.hf_end - w.start for r in hf for w in r.windows if w.hf_end is not None]
    it_hf_part = [w.hf_end - w.start for r in it for w in r.windows if w.hf_end is not None]
    commit = [w.end - w.hf_end for r in it for w in r.windows if w.end is not None and w.hf_end is not None]
    blocked_it = [x for r in it for x in _blocked_per_save(r)]
    blocked_hf = [x for r in hf for x in _blocked_per_save(r)]
    saves = len(it[0].windows) if it else 0
    step_s = median([_step_time(r, s.logging_steps) for r in hf])
    # Where the loop time lost to itertrain's part of a save crosses 3 %: the training time between
    # two saves must be at least extra / 0.03 - (HF's own save), whatever N is.
    extra = median(blocked_it) - median(blocked_hf) if blocked_it and blocked_hf else None
    min_interval = (extra / 0.03 - median(blocked_hf)) if extra is not None else None
    detail = {
        "model": s.model.key, "max_steps": s.max_steps, "save_steps": s.save_steps, "saves_per_run": saves,
        "hf_save_s_median": round(median(hf_save), 3), "itertrain_hf_save_part_s_median": round(median(it_hf_part), 3),
        "itertrain_commit_latency_s_median": round(median(commit), 3),
        "loop_blocked_per_save_s_itertrain": round(median(blocked_it), 3) if blocked_it else None,
        "loop_blocked_per_save_s_hf": round(median(blocked_hf), 3) if blocked_hf else None,
        "hf_step_s_median": round(step_s, 3),
        "train_runtime_s_itertrain": round(median([train_runtime(r) for r in it]), 3),
        "train_runtime_s_hf": round(median([train_runtime(r) for r in hf]), 3),
        "min_seconds_between_saves_for_1.03x": round(max(min_interval, 0.0), 1) if min_interval is not None else None,
        "min_save_steps_for_1.03x": (int(-(-max(min_interval, 0.0) // step_s)) if min_interval is not None and step_s
                                     else None),
    }
    f1 = ratio_figure(
        f"training wall time, checkpoint every {s.save_steps} steps (train())", rt_it, rt_hf,
        target="<= 1.03x", unit="s", limit=1.03, detail=detail,
    )
    f2 = ratio_figure(
        "training job, whole-process wall time (launch to exit)", [r.wall for r in it], [r.wall for r in hf],
        target="(info)", unit="s",
    )
    # The training loop's loss per save (both variants): HF's save, plus whatever itertrain adds on the path.
    f3 = ratio_figure("training loop time lost per checkpoint save", blocked_it, blocked_hf, target="(info)",
                      unit="s", paired=False)
    # How long after HF's last file the manifest lands (on the loop's path unless committed asynchronously).
    f4 = Figure("checkpoint commit latency per save (HF's last file -> manifest: xxh3 + fsync)",
                median(commit), median(hf_save), (median(commit) / median(hf_save)) if hf_save else None,
                "(info: vs HF's save time)", None, len(commit), "s",
                {"commit_range": spread(commit), "hf_save_range": spread(hf_save)})
    return [f1, f2, f3, f4]
