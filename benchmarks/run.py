"""Benchmark runner: prints one JSON line per figure, then a markdown table.

    python benchmarks/run.py                      # full run (~100M-parameter model, 1.2 GB checkpoints)
    python benchmarks/run.py --quick              # smoke check with a small model, a few minutes
    python benchmarks/run.py --only resume,verify --repeats 7

Figures: plan (discover + decide on synthetic dirs), train (wall time with checkpoints vs plain HF),
resume (launch -> first step vs plain HF resume), verify (checksum throughput vs raw read),
memory (peak RSS during save and resume vs plain HF), lora (LoRA checkpoint size, save time and resume
vs plain HF + PEFT and vs full fine-tuning), async (--async_save vs HF's save, saving every 5 steps: loop
time lost per save, train() time, peak RSS; and one in-memory copy of the same state, the floor of any
snapshot).
Compared variants always run interleaved in one invocation; medians are reported. Progress goes to stderr, results to stdout.
Large scratch files (checkpoints) are deleted at the end unless --keep; the model and the synthetic
plan dirs (sparse files) stay cached in the work dir (default /tmp/itertrain-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    async_save,
    lora,
    memory,
    plan_time,
    resume_latency,
    train_overhead,
    verify_throughput,
)
from benchmarks.common import Settings, log, markdown_table, rmtree  # noqa: E402

MODULES = {
    "plan": plan_time,
    "verify": verify_throughput,
    "resume": resume_latency,
    "train": train_overhead,
    "memory": memory,
    "lora": lora,
    "async": async_save,
}


def machine() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(next(x.split()[1] for x in f if x.startswith("MemTotal"))) / 2**20, 1)
        info["load_avg"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def product_state() -> dict:
    """The commit and a fingerprint of uncommitted changes under itertrain/ (what is being measured)."""
    import hashlib
    import subprocess

    from benchmarks.common import REPO

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "itertrain") + git("status", "--porcelain", "--", "itertrain")
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "itertrain_dirty": hashlib.sha1(diff.encode()).hexdigest()[:10] if diff.strip() else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model and sizes: a smoke check in a few minutes")
    p.add_argument("--only", action="append", default=[],
                   help=f"figures to run (comma-separated or repeated): {', '.join(MODULES)}")
    p.add_argument("--repeats", type=int, default=None, help="runs per variant (default 5; 3 with --quick)")
    p.add_argument("--work", type=Path, default=None, help="cache and scratch dir (default /tmp/itertrain-bench)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-page-cache variants")
    p.add_argument("--keep", action="store_true", help="keep the large checkpoints for the next run")
    p.add_argument("--json-out", type=Path, default=None, help="also write all figures to this JSON file")
    p.add_argument("--verbose", action="store_true")
    ns = p.parse_args(argv)
    only = [x.strip() for arg in ns.only for x in arg.split(",") if x.strip()] or list(MODULES)
    unknown = [x for x in only if x not in MODULES]
    if unknown:
        p.error(f"unknown figure(s) {unknown}; choose from {list(MODULES)}")
    cold = not ns.no_cold and os.geteuid() == 0
    s = Settings.make(ns.quick, ns.repeats, ns.work, cold, ns.verbose)
    s.work.mkdir(parents=True, exist_ok=True)
    rmtree(s.work / "logs")  # this run's logs only
    info = machine()
    state = product_state()
    log(s, f"machine: {info}")
    log(s, f"measuring itertrain at {state}")
    log(s, f"settings: quick={s.quick} repeats={s.repeats} model={s.model.key} cold={s.cold} work={s.work}")
    session: dict = {}
    figs = []
    started = time.time()
    try:
        for name in MODULES:
            if name not in only:
                continue
            t = time.time()
            for f in MODULES[name].figures(s, session):
                f.emit()
                figs.append(f)
            log(s, f"{name}: {time.time() - t:.0f}s")
    finally:
        if not ns.keep:
            rmtree(s.work / "scratch")
            rmtree(s.work / "resume")
    log(s, f"total {time.time() - started:.0f}s")
    end_state = product_state()
    if end_state != state:
        log(s, f"WARNING: itertrain/ changed during the run ({state} -> {end_state}): the figures mix versions")
    print()
    print(markdown_table(figs))
    if ns.json_out:
        ns.json_out.write_text(json.dumps({"machine": info, "product": {"start": state, "end": end_state},
                                           "settings": {
            "quick": s.quick, "repeats": s.repeats, "model": s.model.key, "max_steps": s.max_steps,
            "save_steps": s.save_steps, "batch_size": s.batch_size, "seq_tokens": s.seq_chars + 2, "cold": s.cold},
            "figures": [f.__dict__ for f in figs]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
