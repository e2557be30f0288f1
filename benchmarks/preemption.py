#!/usr/bin/env python
"""Preemption, node loss, orphans and restarts, measured with real torchrun jobs (2 ranks, the tiny
model, gloo). Prints one JSON line per trial, then a markdown table of medians.

    python benchmarks/preemption.py                  # every figure, 3 trials each
    python benchmarks/preemption.py --only sigterm,node --trials 5

Figures (times from the signal or kill, wall clock, polled every 20 ms):
- sigterm:   SIGTERM to torchrun mid-iteration: steps finished when the signal arrived, the step of the
             committed preemption checkpoint, the steps lost, time until every worker exited and until
             torchrun exited; the same with --preemption false for comparison.
- node:      two agents (--nnodes=2, static rendezvous); node 1's agent and worker SIGKILLed (a node
             lost), or SIGSTOPped (a node frozen: only --dist_timeout_s, here 20 s, can tell): time until
             node 0's worker and agent exited.
- orphans:   the torchrun agent alone SIGKILLed: time until its workers exited.
- restart:   torchrun --max-restarts: a rank SIGKILLed; time until the restarted attempt printed its plan.
- agreement: the per-step preemption check (one int64 all-reduce MAX on itertrain's gloo group), in µs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from jobs import PY, Job, alive, torchrun_cmd  # noqa: E402

POLL_S = 0.02
LOSS = r"\{'loss': "


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ITERTRAIN_FAULT", "RANK", "WORLD_SIZE", "MASTER_"))}
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
              "PYTHONPATH": os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])})
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path) -> tuple[Path, Path]:
    model, data = work / "tiny", work / "train.jsonl"
    if not model.exists():
        subprocess.run([PY, "-m", "itertrain", "init-model", str(model)], check=True, env=env(), stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(96))))
    return model, data


def flags(out: Path, model: Path, data: Path, *extra: str, steps: int = 400, save: int = 10000) -> list[str]:
    return ["--model_name", str(model), "--output_dir", str(out), "--train_file", str(data), "--num_iterations", "1",
            "--max_steps", str(steps), "--save_steps", str(save), "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none", *extra]


def wait_gone(pids: list[int], since: float, limit: float = 120) -> float | None:
    while any(alive(p) for p in pids):
        if time.monotonic() - since > limit:
            return None
        time.sleep(POLL_S)
    return round(time.monotonic() - since, 3)


def sigterm(work: Path, model: Path, data: Path, preemption: bool) -> dict:
    out = work / f"sigterm-{preemption}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = torchrun_cmd(flags(out, model, data, "--preemption", str(preemption).lower()), port=free_port())
    with Job(cmd, env()) as job:
        job.wait_for(LOSS, 20)
        workers = list(job.workers().values())
        done = job.count(LOSS)
        t = time.monotonic()
        job.signal_agent(signal.SIGTERM)
        workers_exit = wait_gone(workers, t)
        job.wait(120)
        agent_exit = round(time.monotonic() - t, 3)
    saved = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "itertrain.manifest.json").exists()]
    kept = max(saved, default=0)
    return {"figure": "sigterm", "preemption": preemption, "steps_done_at_signal": done, "checkpoint_step": kept,
            "steps_lost": max(0, done - kept), "workers_exit_s": workers_exit, "torchrun_exit_s": agent_exit}


def node_loss(work: Path, model: Path, data: Path, how: str) -> dict:
    out = work / f"node-{how}"
    shutil.rmtree(out, ignore_errors=True)
    port = free_port()
    args = flags(out, model, data, "--dist_timeout_s", "20")

    def node(rank: int) -> Job:
        return Job([PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                    "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train_iterative.py"), *args], env())

    with node(0) as n0, node(1) as n1:
        n0.wait_for(LOSS, 10)
        survivors = list(n0.workers().values())
        victims = n1.ours()
        t = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL if how == "KILL" else signal.SIGSTOP)
        worker_exit = wait_gone(survivors, t, limit=300)
        try:
            n0.wait(300)
            agent_exit = round(time.monotonic() - t, 3)
        except AssertionError:
            agent_exit = None
        if how == "STOP":
            for pid in victims:
                os.kill(pid, signal.SIGCONT)
            n1.kill()
    return {"figure": "node", "loss": "killed" if how == "KILL" else "frozen (dist_timeout_s 20)",
            "node0_worker_exit_s": worker_exit, "node0_torchrun_exit_s": agent_exit}


def orphans(work: Path, model: Path, data: Path) -> dict:
    out = work / "orphans"
    shutil.rmtree(out, ignore_errors=True)
    with Job(torchrun_cmd(flags(out, model, data), port=free_port()), env()) as job:
        job.wait_for(LOSS, 5)
        workers = list(job.workers().values())
        t = time.monotonic()
        job.signal_agent(signal.SIGKILL)
        return {"figure": "orphans", "workers_exit_s": wait_gone(workers, t)}


def restart(work: Path, model: Path, data: Path, kills: int) -> list[dict]:
    out = work / "restart"
    shutil.rmtree(out, ignore_errors=True)
    cmd = torchrun_cmd(flags(out, model, data, steps=2000, save=20), port=free_port(), extra=[f"--max-restarts={kills}"])
    rows = []
    with Job(cmd, env()) as job:
        for n in range(kills):
            job.wait_for("CHECKPOINT RECOVERY SYSTEM", n + 1, timeout=600)
            job.wait_for(LOSS, job.count(LOSS) + 3, timeout=600)
            workers = job.workers()
            t = time.monotonic()
            os.kill(workers[1], signal.SIGKILL)
            job.wait_for("CHECKPOINT RECOVERY SYSTEM", n + 2, timeout=600)
            plan = round(time.monotonic() - t, 3)
            job.wait_for(LOSS, job.count(LOSS) + 1, timeout=600)
            rows.append({"figure": "restart", "plan_after_kill_s": plan, "first_step_after_kill_s":
                         round(time.monotonic() - t, 3)})
        job.kill()
    return rows


AGREEMENT = """
import os, time, torch
from itertrain import distributed
distributed.init(60, 60)
for _ in range(50): distributed.max_over_ranks(0)
t = time.perf_counter(); n = 2000
for _ in range(n): distributed.max_over_ranks(0)
if distributed.is_main(): print("US", (time.perf_counter() - t) / n * 1e6, flush=True)
distributed.shutdown()
"""


def agreement(work: Path) -> dict:
    script = work / "agreement.py"
    script.write_text(AGREEMENT)
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(script)], capture_output=True, text=True, env=env(), timeout=300)
    us = next((float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("US")), None)
    return {"figure": "agreement", "us_per_check": round(us, 1) if us else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="sigterm,node,orphans,restart,agreement")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="itertrain-preempt-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work)
    only = set(a.only.split(","))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for _ in range(a.trials):
        if "sigterm" in only:
            emit(sigterm(work, model, data, True))
            emit(sigterm(work, model, data, False))
        if "node" in only:
            emit(node_loss(work, model, data, "KILL"))
        if "orphans" in only:
            emit(orphans(work, model, data))
    if "node" in only:
        emit(node_loss(work, model, data, "STOP"))
    if "restart" in only:
        for row in restart(work, model, data, a.trials):
            emit(row)
    if "agreement" in only:
        emit(agreement(work))
    print("\n| figure | measure | median | all |\n| --- | --- | --- | --- |")
    groups: dict[tuple, list] = {}
    for row in rows:
        key_parts = tuple(f"{k}={v}" for k, v in row.items() if isinstance(v, (bool, str)) and k != "figure")
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                groups.setdefault((row["figure"], *key_parts, k), []).append(v)
    for (figure, *rest), values in groups.items():
        measure = rest[-1] + (f" ({', '.join(rest[:-1])})" if rest[:-1] else "")
        print(f"| {figure} | {measure} | {statistics.median(values):g} | {', '.join(f'{v:g}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
