#!/usr/bin/env python
"""The kill-and-relaunch half of the lower-bound check (scripts/check_lowest.sh runs it in .venv-lowest).

itertrain overrides private HF Trainer methods, so the lowest declared versions must do a real recovery:
a 2-iteration, 2-rank sft run under torchrun (full fine-tuning, then LoRA adapters) is SIGKILLed inside a
checkpoint save of iteration 0, relaunched
with `--resume_from auto --resume_from_iteration auto`, SIGKILLed again inside iteration 1's first save,
and relaunched again. It must finish, `itertrain verify` must exit 0, and iter_0 and iter_1 must equal,
byte for byte, those of an uninterrupted run in the same environment; TensorBoard events and `itertrain plot`
must work too. Exit 0 when all of that holds.

usage: python scripts/check_lowest.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "huggingface-hub", "safetensors", "peft")
# The same sequence with LoRA adapters (PEFT at its floor): iter_K is the adapter only.
LORA = (("--use_peft", "--iteration_model", "adapter"), "adapter_model.safetensors")
FLAGS = ["--num_iterations", "2", "--max_steps", "12", "--save_steps", "4", "--per_device_train_batch_size", "4",
         "--logging_steps", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "none"]


class CheckFailed(Exception):
    pass


def env(fault: str | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ITERTRAIN_FAULT", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if fault:
        e["ITERTRAIN_FAULT"] = fault
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOGS: list[Path] = []


def run(cmd: list[str], fault: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(fault), cwd=REPO, timeout=timeout)
    if LOGS:  # every command's full output, for a failure's post-mortem
        log = LOGS[0] / f"{len(list(LOGS[0].glob('*.log'))):02d}.log"
        log.write_text(f"$ {' '.join(cmd)}\nITERTRAIN_FAULT={fault}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}")
    print(f"  [{time.monotonic() - t0:5.1f}s] exit {r.returncode}: {' '.join(cmd[-6:])}"
          + (f"  (ITERTRAIN_FAULT={fault})" if fault else ""), flush=True)
    return r


def torchrun(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(REPO / "train_iterative.py"), *args], fault)


def expect(condition: bool, what: str, r: subprocess.CompletedProcess | None = None) -> None:
    if not condition:
        tail = "" if r is None else f"\n--- stdout (tail) ---\n{r.stdout[-4000:]}\n--- stderr (tail) ---\n{r.stderr[-4000:]}"
        raise CheckFailed(what + tail)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(work: Path, extra: tuple[str, ...] = (), weights: str = "model.safetensors") -> None:
    """The kill-and-relaunch sequence in `work`; `extra`: flags for every run (e.g. LoRA), `weights`: the
    file of iter_K compared byte for byte."""
    model, data = work.parent / "tiny-model", work.parent / "train.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    LOGS[:] = [work / "logs"]
    LOGS[0].mkdir(exist_ok=True)
    if not model.exists():
        r = run([sys.executable, "-m", "itertrain", "init-model", str(model)])
        expect(r.returncode == 0, "itertrain init-model failed", r)
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(96):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    args = ["--model_name", str(model), "--train_file", str(data), *FLAGS, *extra]
    auto = ["--resume_from", "auto", "--resume_from_iteration", "auto"]

    ref, out = work / "reference", work / "interrupted"
    r = torchrun([*args, "--output_dir", str(ref)])
    expect(r.returncode == 0, "the uninterrupted reference run failed", r)

    # Killed inside the save of iteration 0's second checkpoint (step 8): checkpoint-4 is committed.
    r = torchrun([*args, "--output_dir", str(out)], fault="checkpoint.save=kill#2")
    expect(r.returncode == -signal.SIGKILL, "the run was to be SIGKILLed inside a checkpoint save", r)
    expect((out / "checkpoint-4" / "itertrain.manifest.json").is_file() and not (out / "iter_0").exists(),
           "after the first kill, checkpoint-4 should be committed and iter_0 absent", r)

    # Relaunch: full restore from checkpoint-4; killed again inside iteration 1's first save.
    r = torchrun([*args, "--output_dir", str(out), *auto], fault="checkpoint.save=kill#3")
    expect(r.returncode == -signal.SIGKILL, "the relaunch was to be SIGKILLed inside iteration 1's first save", r)
    expect(f"Found trainer checkpoint: {out}/checkpoint-4" in r.stdout and "Continuing at: iteration 0, step 4" in r.stdout,
           "the first relaunch did not resume iteration 0 from checkpoint-4", r)

    # Relaunch: weights from iter_0, optimizer moments from its last checkpoint, iteration 1 from step 0.
    r = torchrun([*args, "--output_dir", str(out), *auto])
    expect(r.returncode == 0, "the second relaunch did not complete", r)
    expect(f"Found COMPLETE iteration 0 model: {out}/iter_0" in r.stdout and "Continuing at: iteration 1, step 0" in r.stdout,
           "the second relaunch did not resume iteration 1 from iter_0", r)

    r = run([sys.executable, "-m", "itertrain", "verify", str(out)])
    expect(r.returncode == 0, "itertrain verify found a problem in the resumed experiment", r)
    for k in (0, 1):
        a, b = ref / f"iter_{k}" / weights, out / f"iter_{k}" / weights
        expect(a.is_file() and b.is_file(), f"iter_{k}/{weights} is missing")
        expect(sha256(a) == sha256(b), f"iter_{k}/{weights} of the resumed run differs from the uninterrupted run")
        print(f"  iter_{k}/{weights} identical to the uninterrupted run ({sha256(b)[:16]})")

    # The per-iteration metrics: TensorBoard events (written during the run) and the plot (matplotlib).
    expect(any((out / "runs" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events were written")
    png = work / "metrics.png"
    r = run([sys.executable, "-m", "itertrain", "plot", str(out), "--out", str(png)])
    expect(r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "itertrain plot did not write a PNG", r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where to run (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ns = ap.parse_args()
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    print(f"kill-and-relaunch check on Python {sys.version.split()[0]}: {', '.join(versions)}", flush=True)
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="itertrain-lowest-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        print("full fine-tuning:", flush=True)
        check(work / "full")
        print("LoRA adapters (--use_peft --iteration_model adapter):", flush=True)
        check(work / "lora", *LORA)
    except CheckFailed as e:
        print(f"LOWER-BOUND CHECK FAILED: {e}\n(work directory and every command's output kept: {work})", file=sys.stderr, flush=True)
        print("kill-and-relaunch: 0 passed, 1 failed")
        return 1
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kill-and-relaunch: resumed run byte-identical, verify ok ({time.monotonic() - t0:.0f}s)")
    print("kill-and-relaunch: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
