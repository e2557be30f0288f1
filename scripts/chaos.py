#!/usr/bin/env python
"""Crash harness: kill an itertrain run anywhere, relaunch with auto/auto, demand identical results.

1. Runs a reference experiment uninterrupted (torchrun, N ranks).
2. Runs the same experiment again, SIGKILLing the whole process group (torchrun and every rank) at
   chosen moments: at named fault points inside saves, manifest writes, iteration commits, between
   stages and during generation (ITERTRAIN_FAULT, see itertrain/faults.py), and at random times
   (timer kills). After every kill it relaunches with `--resume_from auto --resume_from_iteration auto`.
3. Checks that every relaunch resumed at or after the newest committed point (no lost work), then
   compares every iteration model (the safetensors bytes), the generated data and the evaluation
   metrics with the reference. Any difference fails with the seed and the kill sequence.

    python scripts/chaos.py --kills 8 --seed 3          # a soak
    python scripts/chaos.py --ci                         # the bounded set CI runs (>= 6 kills)
    python scripts/chaos.py --ci --async_save            # the killed runs save with --async_save (the
                                                         # reference does not): kills inside the background writer
    python scripts/chaos.py --ci --strategy iterative_dpo   # the same for iterative DPO (TRL's DPOTrainer)
    python scripts/chaos.py --ci --strategy grpo         # GRPO iterations (or rloo): kills inside generation blocks
    python scripts/chaos.py --ci --lora adapter          # the same with LoRA adapters (or --lora merged)
    python scripts/chaos.py --ci --generation_backend vllm   # sampling on vLLM (.venv-vllm): fewer kills

Prints a JSON summary last (also written to --report).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from chaos_inspect import committed_point, corrupt_newest_adapter, resumed_at  # noqa: E402
sys.path.insert(0, str(REPO))

from itertrain.faults import kill_tree  # noqa: E402

# Named kill points and what they interrupt (hit = which arrival in that launch fires it).
POINTS = {
    "checkpoint.save": "inside a trainer-checkpoint save, before any file is written",
    "checkpoint.optimizer": "inside a trainer-checkpoint save: weights written, optimizer not",
    "checkpoint.commit": "after every rank wrote its files, before the manifest",
    "manifest.trainer_checkpoint.write": "inside a checkpoint manifest write (temp file)",
    "manifest.trainer_checkpoint.after": "after a checkpoint manifest, before rotation",
    "iteration.save": "inside an iteration-model commit, before any file",
    "iteration.before_manifest": "iteration model written, manifest not",
    "manifest.iteration_model.write": "inside the iteration manifest write",
    "iteration.after_manifest": "iteration committed, its checkpoints not retired",
    "iteration.retire": "while retiring an iteration's checkpoints",
    "stage.generate": "between stages: before generate",
    "stage.train": "between stages: before train",
    "stage.evaluate": "between stages: before evaluate",
    "stage.commit": "between stages: before commit",
    "generation.batch": "during generation, between batches",
    "manifest.data.write": "inside the generated-data commit",
    "train.step": "during training, after an optimizer step",
    "reference.load": "grpo/rloo: while TRL's trainer loads the reference model",
}
# With --async_save: points inside the background writer (besides checkpoint.optimizer, reached there
# too, and checkpoint.commit / manifest.*, reached from the writer's commit).
ASYNC_POINTS = {
    "checkpoint.write.weights": "--async_save writer: model.safetensors written, optimizer.pt not",
    "checkpoint.write.optimizer": "--async_save writer: HF's optimizer write starting (optimizer.pt not yet)",
    "checkpoint.write.done": "--async_save writer: this rank's files written, not yet committed",
}
# The bounded sequence CI runs: every save path at least once, in the order the run reaches them.
CI_SEQUENCE = [
    ("checkpoint.optimizer", 2),  # iteration 0: inside the save of checkpoint-8
    ("manifest.trainer_checkpoint.write", 1),  # inside the manifest of checkpoint-8
    ("iteration.before_manifest", 1),  # inside the commit of iter_0
    ("iteration.after_manifest", 1),  # iter_0 committed, checkpoints not retired yet
    ("manifest.data.write", 1),  # inside the commit of data/iter_1
    ("generation.batch", 2),  # while regenerating data/iter_1
    ("checkpoint.commit", 2),  # training iteration 1 on its committed data
    ("timer", 0),  # a random moment of what is left
]
# The same with --async_save, plus kills inside the background writer between its files.
CI_SEQUENCE_ASYNC = [
    ("checkpoint.write.weights", 2),  # iteration 0: checkpoint-8's weights written, the rest not
    ("checkpoint.write.optimizer", 1),  # resumed at 4: checkpoint-8's optimizer write starting
    ("checkpoint.optimizer", 2),  # resumed at 4: checkpoint-8 committed, inside the write of checkpoint-12
    ("manifest.trainer_checkpoint.write", 1),  # resumed at 8: inside the manifest of checkpoint-12
    ("iteration.before_manifest", 1),  # inside the commit of iter_0
    ("iteration.after_manifest", 1),  # iter_0 committed, checkpoints not retired yet
    ("manifest.data.write", 1),  # inside the commit of data/iter_1
    ("generation.batch", 2),  # while regenerating data/iter_1
    ("checkpoint.write.done", 3),  # iteration 1: a rank's files of checkpoint-8 written, commit not
    ("checkpoint.commit", 2),  # training iteration 1: every rank wrote checkpoint-8, manifest not
    ("timer", 0),  # a random moment of what is left
]
# iterative_dpo: iteration 0 is SFT (the sequence above covers it); the kills land in the DPO iterations.
DPO_CI_SEQUENCE = [
    ("iteration.after_manifest", 1),  # iter_0 committed, its checkpoints not retired yet
    ("generation.batch", 2),  # while sampling data/iter_1 from iter_0
    ("manifest.data.write", 1),  # inside the commit of data/iter_1 (samples, pairs)
    ("train.step", 6),  # DPO training of iteration 1, between checkpoint-4 and checkpoint-8
    ("checkpoint.optimizer", 1),  # inside a DPO checkpoint save: weights written, optimizer not
    ("manifest.trainer_checkpoint.write", 1),  # inside a DPO checkpoint's manifest
    ("iteration.after_manifest", 1),  # iter_1 committed, its checkpoints not retired yet
    ("timer", 0),  # a random moment of what is left
]
# --generation_backend vllm: each launch starts a vLLM engine per rank (slow on CPU), so fewer kills: inside
# generation, inside the data commit, in training.
VLLM_CI_SEQUENCE = [
    ("generation.batch", 2),  # while sampling data/iter_1 on vLLM
    ("manifest.data.write", 1),  # inside the commit of data/iter_1
    ("train.step", 6),  # training iteration 1 on its committed data
]
# grpo / rloo: iteration 0 is SFT (12 steps); RL iterations (12 steps) generate every 2 steps and save every 4
# (block boundaries). Launch counters restart at each relaunch.
GRPO_CI_SEQUENCE = [
    ("train.step", 19),  # RL iteration 1, step 7: inside the generation block of steps 7-8, checkpoint-4 committed
    ("checkpoint.optimizer", 1),  # resumed at 4: inside the save of checkpoint-8 (weights written, optimizer not)
    ("reference.load", 1),  # resumed at 4: while TRL loads the reference model (iter_0)
    ("manifest.trainer_checkpoint.write", 1),  # inside checkpoint-8's manifest
    ("iteration.after_manifest", 1),  # iter_1 committed, its checkpoints not retired yet
    ("train.step", 5),  # RL iteration 2, step 5: inside a generation block
    ("timer", 0),  # a random moment of what is left
]
# What each strategy's data/iter_K must hold identically to the reference (grpo, rloo: none, they sample inside
# training).
DATA_FILES = {"expert_iteration": ("accepted.jsonl",), "iterative_dpo": ("samples.jsonl", "pairs.jsonl"),
              "grpo": (), "rloo": ()}
# With --lora: the same save paths, plus a fallback past a corrupt newest adapter checkpoint.
CORRUPT = "corrupt"  # third element: after the kill, damage the newest committed checkpoint's adapter file
LORA_CI_SEQUENCE = [
    ("checkpoint.optimizer", 2),  # iteration 0: inside the save of checkpoint-8 (adapter written, optimizer not)
    ("checkpoint.save", 2, CORRUPT),  # before checkpoint-12; then checkpoint-8's adapter is damaged: back to 4
    ("iteration.before_manifest", 1),  # inside the commit of iter_0 (merged model, or adapter only)
    ("iteration.after_manifest", 1),  # iter_0 committed, its checkpoints not retired yet
    ("generation.batch", 2),  # sampling data/iter_1 from iter_0 (adapter mode: the base plus iter_0's adapter)
    ("checkpoint.commit", 2),  # training iteration 1 on its committed data
    ("timer", 0),  # a random moment of what is left
]
# The file of iter_K compared byte for byte, per --lora mode.
ITERATION_FILES = {None: ("model.safetensors",), "merged": ("model.safetensors",),
                   "adapter": ("adapter_model.safetensors", "adapter_config.json")}


@dataclass
class Launch:
    kill: str  # point name, "timer", or "none"
    hit: int
    delay_s: float
    returncode: int
    killed: bool
    resumed_at: tuple[int, int] | None  # (iteration, step) the launch continued at
    rejected: list[str]  # candidates the launch's plan rejected (e.g. a damaged checkpoint)
    committed_before: tuple[int, int]  # newest committed point before the launch
    wall_s: float


@dataclass
class Summary:
    seed: int
    nproc: int
    kills_requested: int
    async_save: bool = False  # the killed runs saved with --async_save
    launches: list[Launch] = field(default_factory=list)
    kills_done: int = 0
    progress_ok: bool = True
    identical_iterations: int = 0
    total_iterations: int = 0
    identical_data: int = 0
    total_data: int = 0
    differences: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.progress_ok and not self.differences and self.identical_iterations == self.total_iterations
                and self.total_iterations > 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ITERTRAIN_FAULT",)}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    if fault:
        env["ITERTRAIN_FAULT"] = fault
    return env


def prepare(work: Path, iterations: int, strategy: str = "expert_iteration", lora: str | None = None,
            backend: str = "hf") -> list[str]:
    """Tiny model, data, and the experiment's flags (without --output_dir)."""
    model = work / "tiny-model"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "itertrain", "init-model", str(model)], check=True,
                       stdout=subprocess.DEVNULL, env=env_for(None))
    rng = random.Random(0)
    train, prompts = work / "train.jsonl", work / "prompts.jsonl"
    with open(train, "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    with open(prompts, "w") as f:
        for _ in range(24):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    # Expert iteration keeps every sample (threshold 0: the tiny model is rarely right). Iterative DPO
    # scores with partial credit (a batched reward in TRL's form), so that most prompts give a pair
    # (exact match would give none).
    scoring = (["--reward_threshold", "0", "--samples_per_prompt", "2"] if strategy == "expert_iteration" else
               ["--reward_fn", "itertrain.tasks.arithmetic:digit_credit", "--samples_per_prompt", "3"])
    if strategy in ("grpo", "rloo"):  # 4 completions per prompt, a generation every 2 steps, a KL reference
        scoring = ["--reward_funcs", "itertrain.tasks.arithmetic:digit_credit", "--num_generations", "4",
                   "--steps_per_generation", "2", "--beta", "0.1"]
    return [
        "--model_name", str(model), "--strategy", strategy, "--train_file", str(train),
        "--prompts_file", str(prompts), "--temperature", "1.0",
        *scoring, "--max_new_tokens", "4", "--generation_batch_size", "8",
        "--num_iterations", str(iterations), "--max_steps", "12", "--save_steps", "4", "--logging_steps", "2",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
        "--report_to", "none", "--resume_from", "auto", "--resume_from_iteration", "auto",
        *(["--use_peft", "--iteration_model", lora] if lora else []), "--generation_backend", backend,
    ]


def launch(args: list[str], out: Path, nproc: int, fault: str | None, timer: float | None, log) -> tuple[int, bool]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "train_iterative.py"), *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_for(fault), cwd=REPO,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timer if timer is not None else 900)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the timer kill: torchrun and every rank, at once
        proc.wait()
        if timer is None:
            raise
        return proc.returncode, True
    return rc, rc != 0 and fault is not None


_VOLATILE = ("wall_time_s", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def compare(ref: Path, got: Path, summary: Summary, data_files: tuple[str, ...] = DATA_FILES["expert_iteration"],
            files: tuple[str, ...] = ITERATION_FILES[None]) -> None:
    refs = sorted(p.name for p in ref.glob("iter_*"))
    summary.total_iterations = len(refs)
    for name in refs:
        differ = [f for f in files if not (got / name / f).exists()
                  or (ref / name / f).read_bytes() != (got / name / f).read_bytes()]
        b = got / name / files[0]
        if not differ:
            summary.identical_iterations += 1
        summary.differences += [f"{name}/{f} differs from the reference" for f in differ]
        ma = json.loads((ref / name / "itertrain.manifest.json").read_text())["extra"]["metrics"]
        mb = json.loads((got / name / "itertrain.manifest.json").read_text())["extra"]["metrics"] if b.exists() else {}
        for key, value in ma.items():
            if key not in _VOLATILE and mb.get(key) != value:
                summary.differences.append(f"{name} metric {key}: reference {value!r}, resumed {mb.get(key)!r}")
    for d in sorted((ref / "data").glob("iter_*")) if (ref / "data").exists() else []:
        summary.total_data += 1
        differ = [name for name in data_files if not (got / "data" / d.name / name).exists()
                  or (got / "data" / d.name / name).read_bytes() != (d / name).read_bytes()]
        if not differ:
            summary.identical_data += 1
        summary.differences += [f"data/{d.name}/{name} differs from the reference" for name in differ]


def schedule(kills: int, seed: int, ci: bool, strategy: str = "expert_iteration", lora: str | None = None,
             async_save: bool = False) -> list[tuple]:
    if ci:
        if async_save:
            return list(CI_SEQUENCE_ASYNC)
        if strategy in ("grpo", "rloo"):
            return list(GRPO_CI_SEQUENCE)
        return list(LORA_CI_SEQUENCE if lora else DPO_CI_SEQUENCE if strategy == "iterative_dpo" else CI_SEQUENCE)
    rng = random.Random(seed)
    names = sorted({**POINTS, **(ASYNC_POINTS if async_save else {})})
    return [("timer", 0) if rng.random() < 0.3 else (rng.choice(names), rng.randint(1, 2)) for _ in range(kills)]


def run(kills: int, seed: int, nproc: int, work: Path, ci: bool, iterations: int,
        strategy: str = "expert_iteration", lora: str | None = None, async_save: bool = False,
        backend: str = "hf") -> Summary:
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    args = prepare(work, iterations, strategy, lora, backend)
    killed_args = [*args, "--async_save"] if async_save else args  # the reference saves synchronously
    summary = Summary(seed, nproc, kills, async_save)
    ref, out = work / "reference", work / "chaos"
    shutil.rmtree(ref, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    with open(work / "reference.log", "w") as log:
        t = time.time()
        rc, _ = launch(args, ref, nproc, None, None, log)
    if rc != 0:
        raise SystemExit(f"reference run failed (exit {rc}); see {work / 'reference.log'}")
    reference_s = time.time() - t
    # Timer kills land in the work, not in the start-up: a random moment within about two iterations
    # after the plan (the plan's report file marks the end of the start-up).
    plan_files = sorted((ref / "runs").glob("recovery-*.json"))
    startup_s = min(max(plan_files[0].stat().st_mtime - t, 0.0), reference_s) if plan_files else 0.0
    per_iteration_s = (reference_s - startup_s) / iterations
    rng = random.Random(seed)
    seen: set[str] = set()
    damaged: set[str] = set()
    plan = VLLM_CI_SEQUENCE if ci and backend == "vllm" else schedule(kills, seed, ci, strategy, lora, async_save)
    with open(work / "chaos.log", "w") as log:
        for i, (point, hit, *after) in enumerate([*plan, ("none", 0)]):
            before = committed_point(out, frozenset(damaged))
            fault = f"{point}=kill#{hit}" if point not in ("timer", "none") else None
            timer = startup_s + rng.uniform(0.0, 2.0) * per_iteration_s if point == "timer" else None
            log.write(f"\n===== launch {i}: kill at {point}#{hit} timer={timer} =====\n")
            log.flush()
            t = time.time()
            rc, killed = launch(killed_args, out, nproc, fault, timer, log)
            at, rejected = resumed_at(out, seen)
            summary.launches.append(Launch(point, hit, round(timer or 0, 2), rc, killed, at, rejected, before,
                                           round(time.time() - t, 2)))
            if CORRUPT in after and killed:
                hit_path = corrupt_newest_adapter(out)
                damaged.add(hit_path or "")
                log.write(f"\n===== damaged the adapter of {hit_path} =====\n")
            summary.kills_done += killed
            if at is not None and at < before:
                summary.progress_ok = False
                summary.differences.append(f"launch {i} resumed at {at}, behind committed {before}: work was lost")
            if rc == 0:
                break  # the experiment completed (a kill point that was not reached does this too)
            if not killed:
                summary.progress_ok = False
                summary.differences.append(f"launch {i} failed with exit {rc} without being killed")
                break
        else:
            pass
    if not (out / f"iter_{iterations - 1}" / "itertrain.manifest.json").exists():
        summary.differences.append("the killed experiment never completed")
    else:
        compare(ref, out, summary, DATA_FILES[strategy], ITERATION_FILES[lora])
    summary.wall_s = round(time.time() - started, 1)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iterations", type=int, default=None, help="default: one per kill (>= 3); 3 with --ci")
    p.add_argument("--ci", action="store_true", help="the bounded CI sequence (every save path, >= 6 kills)")
    p.add_argument("--async_save", action="store_true",
                   help="the killed runs save with --async_save (the reference does not); kill points inside its writer")
    p.add_argument("--strategy", default="expert_iteration", choices=sorted(DATA_FILES),
                   help="the experiment to kill: expert_iteration, iterative_dpo (DPO iterations on TRL), or grpo / "
                        "rloo (online RL iterations on TRL)")
    p.add_argument("--lora", default=None, choices=["merged", "adapter"],
                   help="train LoRA adapters (--use_peft) with this --iteration_model")
    p.add_argument("--generation_backend", default="hf", choices=["hf", "vllm"],
                   help="sample on vLLM (both runs; --ci then kills inside generation, the data commit and training)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--report", default=None, help="also write the JSON summary here")
    ns = p.parse_args()
    if ns.async_save and (ns.lora or ns.strategy != "expert_iteration"):  # itertrain refuses these (exit 2)
        p.error("--async_save is exercised here with expert iteration only, without --lora")
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="itertrain-chaos-"))
    # named kills fire early in a launch, so a soak needs about one iteration of work per kill
    iterations = ns.iterations or (3 if ns.ci else max(3, ns.kills))
    summary = run(ns.kills, ns.seed, ns.nproc, work, ns.ci, iterations, ns.strategy, ns.lora, ns.async_save,
                  ns.generation_backend)
    result = {**asdict(summary), "ok": summary.ok, "workdir": str(work)}
    text = json.dumps(result, indent=2)
    if ns.report:
        Path(ns.report).write_text(text + "\n")
    for launch_ in summary.launches:
        print(f"  kill {launch_.kill:<36} #{launch_.hit} -> exit {launch_.returncode:>4}, resumed at "
              f"{launch_.resumed_at}, committed before {launch_.committed_before}, {launch_.wall_s}s"
              + "".join(f"\n      rejected {r}" for r in launch_.rejected))
    print(f"kills {summary.kills_done}/{summary.kills_requested}, identical iterations "
          f"{summary.identical_iterations}/{summary.total_iterations}, identical data "
          f"{summary.identical_data}/{summary.total_data}, wall {summary.wall_s}s, seed {ns.seed}")
    for d in summary.differences:
        print(f"  DIFFERENCE: {d}")
    print(text)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
