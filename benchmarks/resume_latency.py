"""Resume latency: launch -> first training step, itertrain (auto/auto, checksums verified) vs plain HF
`resume_from_checkpoint=True`, on the same checkpoint.

The checkpoint (weights + AdamW state + scheduler + RNG + trainer state; 1.2 GB for the full model)
is made once by itertrain itself (killed right after `checkpoint-2` committed). The HF output dir
holds hard links to the very same files (without the manifest), so both read the same bytes.

Each run gets a fresh copy of its pristine directory (big files hard-linked, small ones copied), is
launched with `--log_level info --logging_steps 1`, and is observed from outside only (no hook in
either program):
- the first logged step (`{'loss': ...}`, printed by HF after step 3, the first step after the
  resume, completes): the figure. It is the fair end point: transformers 5 loads weights lazily
  (parameters stay mmap-backed until first written), so itertrain, which loads the weights straight
  from the checkpoint, pays ~0.4 s of page faults in the first optimizer step, while HF pays them
  before the loop when it copies the checkpoint's weights into the base model it loaded;
- `***** Running training *****`: HF logs it after every part of the resume (itertrain's discovery,
  plan, checksum verification, weight load and state probe; HF's weight, optimizer and scheduler
  load), right before the loop (info, for the reason above it flatters itertrain);
then, after the second logged step, the process group is SIGKILLed (the rest is not measured).
Peak RSS (VmHWM) is read from /proc/PID/status as each of these lines arrives.
Cold runs drop the page cache (and wait for it to settle) before each launch.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import (
    MANIFEST,
    Figure,
    Settings,
    child_env,
    dir_bytes,
    drop_caches,
    hf_cmd,
    itertrain_cmd,
    job_flags,
    link_tree,
    log,
    make_data,
    make_model,
    ratio_figure,
    rmtree,
)
from benchmarks.monitor import RunResult, check_ok, run_monitored, save_log

RESUME_STEP = 2
RESUME_MAX_STEPS = 50
MARKS = {
    "loop_start": r"\*\*\*\*\* Running training \*\*\*\*\*",
    "step1": r"'loss'",
    "step2": (r"'loss'", 2),
}


def _flags(s: Settings, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    model = make_model(s.model, s.work)
    data = make_data(s.work, s.seq_chars)
    return job_flags(s, model, data, out, max_steps=RESUME_MAX_STEPS, save_steps=RESUME_STEP, logging_steps=1,
                     extra=("--log_level", "info", *extra))


def prepare(s: Settings, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(itertrain experiment, plain HF output dir), both holding checkpoint-2 (cached). `extra`: itertrain
    flags of both the run that writes the checkpoint and the resumes (e.g. --async_save)."""
    base = s.work / "resume" / (s.model.key + "".join(extra).replace("-", "_"))
    exp, hf = base / "itertrain-exp", base / "hf-out"
    ckpt = f"checkpoint-{RESUME_STEP}"
    if (exp / ckpt / MANIFEST).exists() and (hf / ckpt / "trainer_state.json").exists():
        return exp, hf
    rmtree(base)
    base.mkdir(parents=True)
    log(s, f"resume: making {ckpt} with itertrain (model {s.model.key})")
    r = run_monitored(itertrain_cmd(_flags(s, exp, extra)), env=child_env(), watch_dir=exp, window_end=MANIFEST,
                      stop_after_windows=1, timeout=900)
    check_ok(r, "making the resume checkpoint")
    if not (exp / ckpt / MANIFEST).exists():
        raise RuntimeError(f"{exp / ckpt} was not committed:\n{r.tail()}")
    for extra in exp.iterdir():  # anything past checkpoint-2 (a later save in progress) is not wanted
        if extra.name.startswith("checkpoint-") and extra.name != ckpt:
            rmtree(extra)
    (hf / ckpt).mkdir(parents=True)
    for f in (exp / ckpt).iterdir():
        if f.name != MANIFEST:
            os.link(f, hf / ckpt / f.name)
    os.sync()
    return exp, hf


def checkpoint_dir(s: Settings) -> Path:
    exp, _ = prepare(s)
    return exp / f"checkpoint-{RESUME_STEP}"


def _warm(path: Path) -> None:
    buf = bytearray(8 << 20)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def one_resume(s: Settings, variant: str, tag: str, cold: bool, extra: tuple[str, ...] = ()) -> RunResult:
    exp, hf = prepare(s, extra)
    src = exp if variant == "itertrain" else hf
    out = s.work / "scratch" / f"resume-{variant}-{tag}"
    rmtree(out)
    link_tree(src, out)
    flags = _flags(s, out, extra if variant == "itertrain" else ())
    cmd = (itertrain_cmd(flags) + ["--resume_from", "auto", "--resume_from_iteration", "auto"]
           if variant == "itertrain" else hf_cmd(flags, resume=True))
    if cold:
        if not drop_caches():
            raise RuntimeError("cannot drop the page cache (needs root)")
    else:
        _warm(out / f"checkpoint-{RESUME_STEP}")
    r = run_monitored(cmd, env=child_env(), marks=MARKS, stop_at="step2", timeout=900)
    save_log(s, f"resume-{'cold' if cold else 'warm'}-{variant}-{tag}", r)
    check_ok(r, f"{variant} resume")
    missing = [m for m in MARKS if m not in r.marks]
    if missing:
        raise RuntimeError(f"{variant} resume: no {missing} in the output:\n{r.tail()}")
    if variant == "itertrain" and "Continuing at: iteration 0, step 2" not in r.text:
        raise RuntimeError(f"itertrain did not resume checkpoint-2:\n{r.tail(60)}")
    rmtree(out)
    return r


def collect(s: Settings, session: dict, cold: bool) -> dict[str, list[RunResult]]:
    key = "resume_cold" if cold else "resume_warm"
    if key in session:
        return session[key]
    prepare(s)
    log(s, f"resume ({'cold' if cold else 'warm'} page cache): {s.repeats} interleaved pairs")
    if not cold:  # warm-up, not measured
        for variant in ("hf", "itertrain"):
            one_resume(s, variant, "warmup", False)
    runs: dict[str, list[RunResult]] = {"itertrain": [], "hf": []}
    for i in range(s.repeats):
        order = ("hf", "itertrain") if i % 2 == 0 else ("itertrain", "hf")
        for variant in order:
            r = one_resume(s, variant, str(i), cold)
            runs[variant].append(r)
            log(s, f"  {variant:9s} #{i}: loop start {r.marks['loop_start']:.2f}s, first step logged "
                   f"{r.marks['step1']:.2f}s, step time {r.marks['step2'] - r.marks['step1']:.2f}s")
    session[key] = runs
    return runs


def figures(s: Settings, session: dict) -> list[Figure]:
    figs = []
    ckpt_bytes = dir_bytes(checkpoint_dir(s))
    for cold in ((False, True) if s.cold else (False,)):
        runs = collect(s, session, cold)
        it, hf = runs["itertrain"], runs["hf"]
        label = "cold cache" if cold else "warm cache"
        detail = {"checkpoint_bytes": ckpt_bytes, "model": s.model.key,
                  "step_s_itertrain": round(sorted(r.marks["step2"] - r.marks["step1"] for r in it)[len(it) // 2], 3),
                  "step_s_hf": round(sorted(r.marks["step2"] - r.marks["step1"] for r in hf)[len(hf) // 2], 3)}
        figs.append(ratio_figure(
            f"resume: launch -> first training step done ({label})",
            [r.marks["step1"] for r in it], [r.marks["step1"] for r in hf],
            target="<= 1.10x" if not cold else "<= 1.10x (cold)", unit="s", limit=1.10, detail=detail,
        ))
        figs.append(ratio_figure(
            f"resume: launch -> training loop starts ({label})",
            [r.marks["loop_start"] for r in it], [r.marks["loop_start"] for r in hf], target="(info)", unit="s",
        ))
    return figs
