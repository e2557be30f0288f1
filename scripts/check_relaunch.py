#!/usr/bin/env python
"""The kill-and-relaunch half of the version-range checks, in whichever venv runs it.

scripts/check_versions.sh runs it in .venv-lowest (the floors pyproject.toml declares) and in .venv-newest
(the newest versions in range). itertrain overrides private HF Trainer methods, so both ends of each range
must do a real recovery: a 2-iteration, 2-rank sft run under torchrun (full fine-tuning, then LoRA adapters)
is SIGKILLed inside a checkpoint save of iteration 0, relaunched with
`--resume_from auto --resume_from_iteration auto`, SIGKILLed again inside iteration 1's first save, and
relaunched again. It must finish, `itertrain verify` must exit 0, and iter_0 and iter_1 must equal, byte for
byte, those of an uninterrupted run in the same environment; TensorBoard events and `itertrain plot` must
work too. Exit 0 when all of that holds. The two sequences run at the same time (--jobs 1: one after the
other): each leaves a core idle in its single-process steps and saves, and the other fills it.

usage: python scripts/check_relaunch.py [--label NAME] [--workdir DIR] [--keep]
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub", "safetensors")
FLAGS = ["--num_iterations", "2", "--max_steps", "12", "--save_steps", "4", "--per_device_train_batch_size", "4",
         "--logging_steps", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "none"]


class CheckFailed(Exception):
    pass


@dataclass(frozen=True)
class Sequence:
    """One kill-and-relaunch sequence: its name, its directory, the flags of every run in it and the file of
    iter_K compared byte for byte; `plot`: whether it also checks `itertrain plot` (once per environment)."""
    name: str
    work: Path
    extra: tuple[str, ...] = ()
    weights: str = "model.safetensors"
    plot: bool = False

    def say(self, line: str) -> None:
        print(f"  [{self.name}] {line}", flush=True)


def sequences(work: Path) -> list[Sequence]:
    """Full fine-tuning, then the same with LoRA adapters (iter_K is the adapter only)."""
    return [Sequence("full", work / "full", plot=True),
            Sequence("lora", work / "lora", ("--use_peft", "--iteration_model", "adapter"), "adapter_model.safetensors")]


def env(fault: str | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ITERTRAIN_FAULT", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if fault:
        e["ITERTRAIN_FAULT"] = fault
    return e


_PORTS: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_port() -> int:
    """A free port no other sequence of this check was given (they may run at the same time)."""
    with _PORTS_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS:
                _PORTS.add(port)
                return port


def run(seq: Sequence, cmd: list[str], fault: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(fault), cwd=REPO, timeout=timeout)
    logs = seq.work / "logs"  # every command's full output, for a failure's post-mortem
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{len(list(logs.glob('*.log'))):02d}.log"
    log.write_text(f"$ {' '.join(cmd)}\nITERTRAIN_FAULT={fault}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}")
    seq.say(f"[{time.monotonic() - t0:5.1f}s] exit {r.returncode}: {' '.join(cmd[-6:])}"
            + (f"  (ITERTRAIN_FAULT={fault})" if fault else ""))
    return r


def torchrun(seq: Sequence, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return run(seq, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                     str(REPO / "train_iterative.py"), *args], fault)


def expect(seq: Sequence, condition: bool, what: str, r: subprocess.CompletedProcess | None = None) -> None:
    if not condition:
        tail = "" if r is None else f"\n--- stdout (tail) ---\n{r.stdout[-4000:]}\n--- stderr (tail) ---\n{r.stderr[-4000:]}"
        raise CheckFailed(f"{seq.name}: {what}{tail}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(work: Path) -> tuple[Path, Path]:
    """The tiny model and the training data every sequence uses."""
    model, data = work / "tiny-model", work / "train.jsonl"
    if not model.exists():  # a --workdir used before keeps its model
        r = run(Sequence("setup", work), [sys.executable, "-m", "itertrain", "init-model", str(model)])
        if r.returncode != 0:
            raise CheckFailed(f"itertrain init-model failed\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(96):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return model, data


def check(seq: Sequence, model: Path, data: Path) -> None:
    """The kill-and-relaunch sequence `seq`; raises CheckFailed naming what did not hold."""
    args = ["--model_name", str(model), "--train_file", str(data), *FLAGS, *seq.extra]
    auto = ["--resume_from", "auto", "--resume_from_iteration", "auto"]

    ref, out = seq.work / "reference", seq.work / "interrupted"
    r = torchrun(seq, [*args, "--output_dir", str(ref)])
    expect(seq, r.returncode == 0, "the uninterrupted reference run failed", r)

    # Killed inside the save of iteration 0's second checkpoint (step 8): checkpoint-4 is committed.
    r = torchrun(seq, [*args, "--output_dir", str(out)], fault="checkpoint.save=kill#2")
    expect(seq, r.returncode == -signal.SIGKILL, "the run was to be SIGKILLed inside a checkpoint save", r)
    expect(seq, (out / "checkpoint-4" / "itertrain.manifest.json").is_file() and not (out / "iter_0").exists(),
           "after the first kill, checkpoint-4 should be committed and iter_0 absent", r)

    # Relaunch: full restore from checkpoint-4; killed again inside iteration 1's first save.
    r = torchrun(seq, [*args, "--output_dir", str(out), *auto], fault="checkpoint.save=kill#3")
    expect(seq, r.returncode == -signal.SIGKILL, "the relaunch was to be SIGKILLed inside iteration 1's first save", r)
    expect(seq, f"Found trainer checkpoint: {out}/checkpoint-4" in r.stdout and "Continuing at: iteration 0, step 4" in r.stdout,
           "the first relaunch did not resume iteration 0 from checkpoint-4", r)

    # Relaunch: weights from iter_0, optimizer moments from its last checkpoint, iteration 1 from step 0.
    r = torchrun(seq, [*args, "--output_dir", str(out), *auto])
    expect(seq, r.returncode == 0, "the second relaunch did not complete", r)
    expect(seq, f"Found COMPLETE iteration 0 model: {out}/iter_0" in r.stdout and "Continuing at: iteration 1, step 0" in r.stdout,
           "the second relaunch did not resume iteration 1 from iter_0", r)

    r = run(seq, [sys.executable, "-m", "itertrain", "verify", str(out)])
    expect(seq, r.returncode == 0, "itertrain verify found a problem in the resumed experiment", r)
    for k in (0, 1):
        a, b = ref / f"iter_{k}" / seq.weights, out / f"iter_{k}" / seq.weights
        expect(seq, a.is_file() and b.is_file(), f"iter_{k}/{seq.weights} is missing")
        expect(seq, sha256(a) == sha256(b), f"iter_{k}/{seq.weights} of the resumed run differs from the uninterrupted run")
        seq.say(f"iter_{k}/{seq.weights} identical to the uninterrupted run ({sha256(b)[:16]})")

    # The per-iteration metrics: TensorBoard events (written during the run) and the plot (matplotlib).
    expect(seq, any((out / "runs" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events were written")
    if seq.plot:
        png = seq.work / "metrics.png"
        r = run(seq, [sys.executable, "-m", "itertrain", "plot", str(out), "--out", str(png)])
        expect(seq, r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "itertrain plot did not write a PNG", r)


def run_all(work: Path, jobs: int) -> list[str]:
    """Every sequence, `jobs` at a time; what failed (empty when all held)."""
    model, data = prepare(work)
    failed: list[str] = []

    def one(seq: Sequence) -> None:
        try:
            check(seq, model, data)
        except CheckFailed as e:
            failed.append(str(e))
        except Exception as e:  # a timeout or an OSError in one sequence must not hide the other's result
            failed.append(f"{seq.name}: {type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, sequences(work)))
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="kill-and-relaunch check", help="names the check in its messages")
    ap.add_argument("--workdir", help="where to run (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                    help="sequences at a time (default 2: full and LoRA together; their single-process steps and "
                         "saves leave a core idle that the other fills)")
    ns = ap.parse_args()
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    print(f"{ns.label}, kill-and-relaunch on Python {sys.version.split()[0]}: {', '.join(versions)}", flush=True)
    print("  sequences: full (full fine-tuning) and lora (--use_peft --iteration_model adapter)", flush=True)
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="itertrain-relaunch-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        failed = run_all(work, ns.jobs)
    except CheckFailed as e:
        failed = [str(e)]
    if failed:
        for what in failed:
            print(f"{ns.label.upper()} FAILED: {what}", file=sys.stderr, flush=True)
        print(f"(work directory and every command's output kept: {work})", file=sys.stderr, flush=True)
        print("kill-and-relaunch: 0 passed, 1 failed")
        return 1
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kill-and-relaunch: resumed runs byte-identical, verify ok ({time.monotonic() - t0:.0f}s)")
    print("kill-and-relaunch: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
