"""LoRA (`--use_peft`, r=16 on all linear layers) on the benchmark model: trainer-checkpoint size, save time
and resume time-to-first-step. Three variants, interleaved (the order rotates every repeat):
- `lora`: itertrain with `--use_peft` (checkpoints hold the adapter and its AdamW state);
- `full`: itertrain fine-tuning all weights (the same job as the other figures);
- `hf_peft`: the plain-HF baseline program with PEFT (`hf_train.py --use_peft`: get_peft_model with TRL's
  LoraConfig, `Trainer.train(resume_from_checkpoint=True)`, HF's own adapter loading on resume).

Each repeat, per variant:
1. save: train from scratch with `--save_steps 2` and observe the output dir from outside; the run is
   killed once `checkpoint-2` is complete. Save time = the directory appears -> HF's last file
   (`trainer_state.json`), and for itertrain also -> its manifest (the checkpoint is committed: every
   file hashed and fsynced, on a thread while training goes on). Size = every byte of `checkpoint-2`.
2. resume: relaunch on that checkpoint (itertrain: `--resume_from auto --resume_from_iteration auto`,
   which also deep-verifies the checkpoint and, for LoRA, the fingerprint of the base model the
   adapter applies to; HF: `resume_from_checkpoint=True`) until the first step after the resume is
   logged (launch -> first step done, as in the resume figure), warm page cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import (MANIFEST, Figure, Settings, child_env, dir_bytes, hf_cmd, itertrain_cmd, log, median,
                               ratio_figure, rmtree, scratch_job)
from benchmarks.monitor import RunResult, check_ok, run_monitored, save_log

VARIANTS = ("lora", "full", "hf_peft")
SAVE_STEP = 2
LORA_FLAGS = ("--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05")
MARKS = {"step1": r"'loss'"}


def _job(s: Settings, variant: str, tag: str) -> tuple[Path, list[str]]:
    """The emptied output dir of one variant's job, and its flags."""
    out, flags = scratch_job(s, f"lora-{variant}-{tag}", max_steps=50, save_steps=SAVE_STEP, logging_steps=1,
                             extra=("--log_level", "info"))
    return out, flags + list(LORA_FLAGS if variant != "full" else ())


def _cmd(variant: str, flags: list[str], resume: bool) -> list[str]:
    if variant == "hf_peft":
        return hf_cmd(flags, resume=resume)
    return itertrain_cmd(flags) + (["--resume_from", "auto", "--resume_from_iteration", "auto"] if resume else [])


def one_pair(s: Settings, variant: str, tag: str) -> tuple[RunResult, RunResult, int]:
    """(save run, resume run, checkpoint bytes) of one variant."""
    out, flags = _job(s, variant, tag)
    itertrain = variant != "hf_peft"
    save = run_monitored(_cmd(variant, flags, False), env=child_env(), watch_dir=out,
                         window_end=MANIFEST if itertrain else None, stop_after_windows=1, timeout=1800)
    save_log(s, f"lora-save-{variant}-{tag}", save)
    check_ok(save, f"{variant} save run")
    ckpt = out / f"checkpoint-{SAVE_STEP}"
    for extra in out.iterdir():  # a later save that had started when the run was stopped
        if extra.name.startswith("checkpoint-") and extra != ckpt:
            rmtree(extra)
    size = dir_bytes(ckpt)
    os.sync()
    resume = run_monitored(_cmd(variant, flags, True), env=child_env(), marks=MARKS, stop_at="step1", timeout=1800)
    save_log(s, f"lora-resume-{variant}-{tag}", resume)
    check_ok(resume, f"{variant} resume")
    if "step1" not in resume.marks:
        raise RuntimeError(f"{variant} resume: no step logged:\n{resume.tail()}")
    if itertrain and f"Continuing at: iteration 0, step {SAVE_STEP}" not in resume.text:
        raise RuntimeError(f"itertrain did not resume checkpoint-{SAVE_STEP}:\n{resume.tail(60)}")
    rmtree(out)
    return save, resume, size


def collect(s: Settings, session: dict) -> dict[str, list[tuple[RunResult, RunResult, int]]]:
    if "lora" in session:
        return session["lora"]
    log(s, f"lora: {s.repeats} rounds of {', '.join(VARIANTS)} (save, then resume), model {s.model.key}")
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    for i in range(s.repeats):
        order = VARIANTS[i % 3:] + VARIANTS[:i % 3]
        for variant in order:
            save, resume, size = one_pair(s, variant, str(i))
            runs[variant].append((save, resume, size))
            w = save.windows[0]
            log(s, f"  {variant:8s} #{i}: checkpoint {size / 1e6:.1f} MB, files written {w.hf_end - w.start:.2f}s, "
                   f"committed {(w.end or w.hf_end) - w.start:.2f}s, resume -> first step {resume.marks['step1']:.2f}s")
    session["lora"] = runs
    return runs


def figures(s: Settings, session: dict) -> list[Figure]:
    runs = collect(s, session)
    load = {"load_avg_after": [round(x, 1) for x in os.getloadavg()], "model": s.model.key}

    def sizes(v: str) -> list[float]:
        return [size / 1e6 for _, _, size in runs[v]]

    def written(v: str) -> list[float]:
        return [save.windows[0].hf_end - save.windows[0].start for save, _, _ in runs[v]]

    def committed(v: str) -> list[float]:
        return [(save.windows[0].end or save.windows[0].hf_end) - save.windows[0].start for save, _, _ in runs[v]]

    def first_step(v: str) -> list[float]:
        return [resume.marks["step1"] for _, resume, _ in runs[v]]

    size_detail = {**load, "full_ft_mb": round(median(sizes("full")), 1)}
    return [
        ratio_figure("LoRA r=16: checkpoint size vs plain HF + PEFT", sizes("lora"), sizes("hf_peft"),
                     target="<= 1.01x", unit="MB", limit=1.01, detail=size_detail),
        ratio_figure("LoRA r=16: checkpoint size vs itertrain full fine-tuning (info)", sizes("lora"), sizes("full"),
                     target="(info)", unit="MB"),
        ratio_figure("LoRA r=16: checkpoint save, files written, vs plain HF + PEFT", written("lora"),
                     written("hf_peft"), target="(info)", unit="s", detail=load),
        ratio_figure("LoRA r=16: checkpoint save, committed (hashed + fsynced), vs HF + PEFT files written",
                     committed("lora"), written("hf_peft"), target="(info)", unit="s"),
        ratio_figure("LoRA r=16: checkpoint save, committed, vs itertrain full fine-tuning (info)", committed("lora"),
                     committed("full"), target="(info)", unit="s"),
        ratio_figure("LoRA r=16: resume, launch -> first step done, vs plain HF + PEFT", first_step("lora"),
                     first_step("hf_peft"), target="<= 1.10x", unit="s", limit=1.10, detail=load),
        ratio_figure("LoRA r=16: resume, launch -> first step done, vs itertrain full fine-tuning (info)",
                     first_step("lora"), first_step("full"), target="(info)", unit="s"),
    ]
