"""Unattended recovery and orphans, for real: `torchrun --max-restarts` with ranks SIGKILLed over and
over, and a torchrun agent SIGKILLed under its workers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, base_env, free_port, torchrun
from jobs import Job, alive, torchrun_cmd

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

TESTS = str(Path(__file__).resolve().parent)
KILLS = 10


def args(out: Path, tiny_model: Path, train_file: Path, *extra: str) -> list[str]:
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--num_iterations", "2", "--max_steps", "24", "--save_steps", "4", "--logging_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--report_to", "none", *extra]


def test_torchrun_max_restarts_recovers_from_10_killed_ranks_with_no_human_and_identical_models(
        tmp_path, tiny_model, train_file):
    """One torchrun --max-restarts 10 launch (none/none: a fresh start); after each attempt has made its
    plan, one of its ranks is SIGKILLed at a random moment, 10 times. Every restart must succeed at its
    first try (a failed init would use up the budget), and the job must end by itself with iteration
    models byte-identical to an uninterrupted run's."""
    reference = tmp_path / "reference"
    r = torchrun(*args(reference, tiny_model, train_file))
    assert r.returncode == 0, r.output

    out = tmp_path / "exp"
    rng = random.Random(14)
    cmd = torchrun_cmd(args(out, tiny_model, train_file, "--resume_from", "none", "--resume_from_iteration", "none"),
                       port=free_port(), extra=[f"--max-restarts={KILLS}"])
    with Job(cmd, base_env(), log=tmp_path / "job.log") as job:
        for attempt in range(KILLS):
            job.wait_for("CHECKPOINT RECOVERY SYSTEM", attempt + 1, timeout=600)  # this attempt's plan is made
            time.sleep(rng.uniform(0.5, 4.0))
            workers = {}
            while not workers:  # between attempts there may be none for a moment
                workers = job.workers()
                time.sleep(0.1)
            os.kill(workers[rng.choice(sorted(workers))], signal.SIGKILL)
        assert job.wait(900) == 0, job.output[-4000:]  # no hang, no human
        output = job.output
    assert output.count("CHECKPOINT RECOVERY SYSTEM") == KILLS + 1
    for n in range(1, KILLS + 1):
        assert f"torchrun restart {n} of {KILLS}: continuing this launch as --resume_from auto" in output
    assert "connectFullMesh" not in output and "did not finish within" not in output
    for k in range(2):
        assert (out / f"iter_{k}" / "model.safetensors").read_bytes() == \
            (reference / f"iter_{k}" / "model.safetensors").read_bytes()


def test_workers_die_with_their_torchrun_agent_and_never_block_the_relaunch(tmp_path, tiny_model, train_file):
    """SIGKILL of the torchrun agent alone: its workers (in sessions of their own) must exit at once
    rather than train on as orphans holding the run lock; the relaunch then runs (not exit 3)."""
    out = tmp_path / "exp"
    flags = ["--strategy", "slow_steps:SlowSteps", "--max_steps", "60", "--save_steps", "5"]
    env = base_env({"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), "SLOW_STEP_S": "1"})
    with Job(torchrun_cmd(args(out, tiny_model, train_file, *flags), port=free_port()), env) as job:
        job.wait_for(r"\{'loss': ")
        workers = job.workers()
        assert len(workers) == 2
        job.signal_agent(signal.SIGKILL)
        deadline = time.monotonic() + 30  # orphans would train for about a minute more
        while any(alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers.values()), "workers outlived their agent"

    env["SLOW_STEP_S"] = "0"
    r = torchrun(*args(out, tiny_model, train_file, *flags, "--resume_from", "auto", "--resume_from_iteration", "auto"),
                 env=env)
    assert r.returncode == 0, r.output
    assert "in use by another itertrain run" not in r.output
    assert (out / "iter_1" / "itertrain.manifest.json").exists()


def test_a_process_group_init_that_a_rank_never_joins_ends_with_one_line(tmp_path, tiny_model, train_file):
    """A worker whose peer never comes (rank 1 of 2 is missing) must not wait 30 minutes: after
    --dist_timeout_s it exits with one line, so that torchrun can restart the group."""
    out = tmp_path / "exp"
    env = base_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port()), "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "t",
                    "TORCHELASTIC_USE_AGENT_STORE": "False"})
    r = subprocess.run([sys.executable, str(REPO / "train_iterative.py"), *args(out, tiny_model, train_file),
                        "--dist_timeout_s", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert r.stderr.count("itertrain: error: process-group init did not finish within --dist_timeout_s=5s (rank 0, "
                          "restart 1)") == 1, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
