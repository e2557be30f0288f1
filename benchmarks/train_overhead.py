"""Training overhead: the same job with itertrain vs plain HF Trainer, checkpointing every N steps.

Both run as subprocesses with the same model, data, seed, max_steps, save_steps, batch and dtype
(fp32); interleaved (order alternating A-B / B-A) so drift in the machine's load hits both.
Measured from outside:
- `train_runtime`: HF's own metric of `trainer.train()` (printed by HF's PrinterCallback in both
  variants): the training loop including every checkpoint save and, for itertrain, every commit
  (manifest: xxh3 of every file + fsync), since the commit runs in the on_save callback;
- whole-process wall time, launch to exit (itertrain also commits `iter_0`; the baseline script
  does the equivalent `trainer.save_model`);
- per save, from polling the output dir every 10 ms: the checkpoint directory appears -> HF's last
  file (`trainer_state.json`) appears -> itertrain's manifest appears. The last interval is the
  commit cost of one checkpoint, seen from outside.
"""

from __future__ import annotations

import os
import re

from benchmarks.common import (
    Figure,
    RunResult,
    Settings,
    check_ok,
    child_env,
    hf_cmd,
    itertrain_cmd,
    job_flags,
    log,
    make_data,
    make_model,
    median,
    ratio_figure,
    rmtree,
    run_monitored,
    spread,
)

MANIFEST = "itertrain.manifest.json"
_RUNTIME_RE = re.compile(r"'train_runtime':\s*'?([0-9.]+)")


def train_runtime(r: RunResult) -> float:
    m = _RUNTIME_RE.search(r.text)
    if not m:
        raise RuntimeError(f"no train_runtime in the output of {' '.join(r.cmd)}:\n{r.tail()}")
    return float(m.group(1))


def one_run(s: Settings, variant: str, tag: str, *, max_steps: int, save_steps: int) -> RunResult:
    model = make_model(s.model, s.work)
    data = make_data(s.work, s.seq_chars)
    out = s.work / "scratch" / f"train-{variant}-{tag}"
    rmtree(out)
    flags = job_flags(s, model, data, out, max_steps=max_steps, save_steps=save_steps, logging_steps=s.logging_steps)
    cmd = itertrain_cmd(flags) if variant == "itertrain" else hf_cmd(flags)
    r = run_monitored_job(cmd, out, variant)
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
            log(s, f"  {variant:9s} #{i}: train_runtime {train_runtime(r):.2f}s, wall {r.wall:.2f}s, "
                   f"saves {[round((w.end or 0) - w.start, 2) for w in r.windows]}")
    session["train_runs"] = runs
    return runs


def figures(s: Settings, session: dict) -> list[Figure]:
    runs = collect(s, session)
    it, hf = runs["itertrain"], runs["hf"]
    rt_it, rt_hf = [train_runtime(r) for r in it], [train_runtime(r) for r in hf]
    # Per save, from outside: HF's part (dir appears -> trainer_state.json) and itertrain's commit
    # (trainer_state.json -> manifest). Medians over every save of every run.
    hf_save = [w.hf_end - w.start for r in hf for w in r.windows if w.hf_end is not None]
    it_hf_part = [w.hf_end - w.start for r in it for w in r.windows if w.hf_end is not None]
    commit = [w.end - w.hf_end for r in it for w in r.windows if w.end is not None and w.hf_end is not None]
    saves = len(it[0].windows) if it else 0
    detail = {
        "model": s.model.key, "max_steps": s.max_steps, "save_steps": s.save_steps, "saves_per_run": saves,
        "hf_save_s_median": round(median(hf_save), 3), "itertrain_hf_save_part_s_median": round(median(it_hf_part), 3),
        "itertrain_commit_s_median": round(median(commit), 3), "itertrain_commit_s_range": spread(commit),
    }
    f1 = ratio_figure(
        f"training wall time, checkpoint every {s.save_steps} steps (train_runtime)", rt_it, rt_hf,
        target="<= 1.03x", unit="s", limit=1.03, detail=detail,
    )
    f2 = ratio_figure(
        "training job, whole-process wall time (launch to exit)", [r.wall for r in it], [r.wall for r in hf],
        target="(info)", unit="s",
    )
    # The commit cost per save relative to HF's own save of the same checkpoint.
    f3 = Figure("checkpoint commit cost per save (manifest: xxh3 + fsync), seen from outside",
                median(commit), median(hf_save), (median(commit) / median(hf_save)) if hf_save else None,
                "(info: extra time / HF save time)", None, len(commit), "s",
                {"commit_range": spread(commit), "hf_save_range": spread(hf_save)})
    return [f1, f2, f3]
