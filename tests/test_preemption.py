"""Preemption, for real: SIGTERM/SIGUSR1 to a live torchrun job, the step it stopped at, the relaunch.

A user sees: one line from rank 0 (`itertrain: preempted: ...`, exit 143), a checkpoint committed at
the step the signal arrived in (at most one step lost), the next launch naming it as a preemption
checkpoint and continuing there, and iteration models byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import REPO, base_env, free_port, manifest, torchrun
from jobs import Job, torchrun_cmd

pytestmark = pytest.mark.slow  # real processes: torchrun, training, signals

TESTS = str(Path(__file__).resolve().parent)
LOSS = r"\{'loss': "  # one line per logged step (--logging_steps 1), printed by rank 0 after the step
PREEMPTED_LINE = re.compile(r"^itertrain: preempted: .*\(exit 143\)$", re.M)
WORKER_TRACEBACK = re.compile(r'File "[^"]*/(itertrain|transformers)/')  # torchrun's own traceback is not ours


def env(slow: float = 0.0, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])
    return base_env({"PYTHONPATH": path, "SLOW_STEP_S": str(slow), **extra})


def args(out: Path, tiny_model: Path, train_file: Path, *extra: str, steps: int = 24) -> list[str]:
    """One iteration whose only checkpoint is the one a preemption writes (--save_steps beyond the run)."""
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--strategy", "slow_steps:SlowSteps", "--num_iterations", "1", "--max_steps", str(steps),
            "--save_steps", "1000", "--logging_steps", "1", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, train_file) -> Path:
    """The same experiment, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "exp"
    r = torchrun(*args(out, tiny_model, train_file), env=env())
    assert r.returncode == 0, r.output
    return out


def committed_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if (p / "itertrain.manifest.json").exists())


def relaunch(out: Path, tiny_model: Path, train_file: Path):
    return torchrun(*args(out, tiny_model, train_file), "--resume_from", "auto", "--resume_from_iteration", "auto",
                    env=env())


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "SIGUSR1 to rank 1 only", "SIGTERM to torchrun, --async_save"])
def test_sigterm_to_torchrun_commits_the_step_it_stopped_and_the_relaunch_resumes_there(
        tmp_path, tiny_model, train_file, reference, how):
    """With --async_save the preemption checkpoint is written in the background; every rank waits for
    its commit before exit 143 (the reference saves synchronously: the model must not differ)."""
    out = tmp_path / "exp"
    extra = ["--async_save"] if how.endswith("--async_save") else []
    with Job(torchrun_cmd(args(out, tiny_model, train_file, *extra), port=free_port()), env(slow=0.5)) as job:
        job.wait_for(LOSS, 6)
        done = job.count(LOSS)  # steps finished when the signal is sent; the next one is in progress
        if how.startswith("SIGTERM"):
            job.signal_agent(signal.SIGTERM)  # what SLURM, Kubernetes and spot instances do
        else:
            job.signal_rank(1, signal.SIGUSR1)  # reaches one rank: every rank must learn it
        job.wait(180)
        output = job.output
    assert len(PREEMPTED_LINE.findall(output)) == 1, output  # one line, from rank 0
    assert not WORKER_TRACEBACK.search(output), output
    (name,) = committed_checkpoints(out)  # --save_steps is larger than the run: only the preemption saved
    stopped = int(name.split("-")[1])
    assert abs(stopped - (done + 1)) <= 1, (done, stopped)  # the step in progress, at most one step lost
    signal_name = "SIGTERM" if how.startswith("SIGTERM") else "SIGUSR1"
    assert manifest(out / name)["extra"]["preemption"]["signal"] == signal_name
    assert f"{signal_name}: stopped at step {stopped} ({name} of iteration 0 committed)" in output
    assert not (out / "iter_0").exists()  # the interrupted iteration is neither evaluated nor committed

    r = relaunch(out, tiny_model, train_file)
    assert r.returncode == 0, r.output
    assert f"Continuing at: iteration 0, step {stopped}" in r.stdout
    assert f"{name} is a preemption checkpoint ({signal_name} at step {stopped}" in r.stdout
    assert (out / "iter_0" / "model.safetensors").read_bytes() == \
        (reference / "iter_0" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["grace runs out", "second SIGTERM", "SIGINT"])
def test_a_preemption_save_cut_short_is_never_used(tmp_path, tiny_model, train_file, case):
    """The preemption checkpoint's save hangs (a slow disk): the grace deadline, a second SIGTERM or
    SIGINT (Ctrl-C: KeyboardInterrupt) stop every rank; the unfinished checkpoint has no manifest and
    is never used."""
    out = tmp_path / "exp"
    grace = "3" if case == "grace runs out" else "120"
    cmd = torchrun_cmd(args(out, tiny_model, train_file, "--preemption_grace_s", grace), port=free_port())
    with Job(cmd, env(slow=0.2, ITERTRAIN_FAULT="checkpoint.optimizer=sleep:300")) as job:
        job.wait_for(LOSS, 4)
        job.signal_agent(signal.SIGTERM)
        job.wait_for("⏸️  SIGTERM: every rank stops at step")
        if case != "grace runs out":
            time.sleep(4)  # inside the save (a duplicate within 2 s would count as the same request)
            for pid in job.workers().values():  # as a scheduler signalling every process would
                os.kill(pid, signal.SIGTERM if case == "second SIGTERM" else signal.SIGINT)
        job.wait(120)
        output = job.output
    expected = {"grace runs out": "was not committed within --preemption_grace_s=3s",
                "second SIGTERM": "a second SIGTERM: stopped at once", "SIGINT": "itertrain: interrupted"}[case]
    assert output.count(expected) == 1, output
    assert not WORKER_TRACEBACK.search(output), output
    (torn,) = [p.name for p in out.glob("checkpoint-*")]
    assert not (out / torn / "itertrain.manifest.json").exists()

    r = relaunch(out, tiny_model, train_file)
    assert r.returncode == 0, r.output
    assert f"removed torn {torn}" in r.stdout and "Continuing at: iteration 0, step 0" in r.stdout


@pytest.mark.parametrize("stage,point", [("generate (iteration 1)", "generation.batch"),
                                         ("evaluate (iteration 0)", "stage.evaluate")])
def test_a_signal_during_generation_or_evaluation_stops_at_the_last_committed_point(
        tmp_path, tiny_model, train_file, stage, point):
    out = tmp_path / "exp"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(16)))
    flags = ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
             "--strategy", "expert_iteration", "--prompts_file", str(prompts), "--samples_per_prompt", "2",
             "--max_new_tokens", "4", "--generation_batch_size", "8", "--reward_threshold", "0",
             "--num_iterations", "2", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "4",
             "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none"]
    with Job(torchrun_cmd(flags, port=free_port()), env(ITERTRAIN_FAULT=f"{point}=sleep:300")) as job:
        job.wait_for(f"stage: {stage.split()[0]}", 1 if point == "stage.evaluate" else 1)
        time.sleep(2)  # inside the stage (held open by the fault point)
        job.signal_agent(signal.SIGTERM)
        job.wait(120)
        output = job.output
    assert output.count(f"itertrain: preempted: SIGTERM during {stage}: stopped at once") == 1, output
    assert not WORKER_TRACEBACK.search(output), output
    r = torchrun(*flags, "--resume_from", "auto", "--resume_from_iteration", "auto", env=env())
    assert r.returncode == 0, r.output
    assert (out / "iter_1" / "itertrain.manifest.json").exists()


@pytest.mark.parametrize("flag,text", [
    (["--enable_jit_checkpoint", "true"], "itertrain's own preemption handling replaces it"),
    (["--fsdp", "full_shard"], "FSDP needs GPUs"),
    (["--deepspeed", str(REPO / "missing-ds-config.json")], "DeepSpeed needs GPUs"),
])
def test_hf_jit_checkpoint_and_sharding_on_cpu_are_refused_before_anything_is_written(
        tmp_path, tiny_model, train_file, flag, text):
    out = tmp_path / "exp"
    r = torchrun(*args(out, tiny_model, train_file), *flag, env=env())
    assert "exitcode  : 2" in r.stderr, r.output
    assert r.output.count(text) == 1 and "itertrain: error:" in r.stderr
    assert not out.exists()


def test_a_relaunch_at_an_iterations_final_step_waits_for_every_rank_before_the_commit_moves_the_checkpoint(
        tmp_path, tiny_model, train_file):
    """SIGTERM while checkpoint-12 (iteration 0's last step, --async_save) commits: the job stops there,
    committed. The relaunch trains nothing (every rank reads that checkpoint's trainer state) and rank 0's
    commit of iter_0 moves checkpoint-12 into it: rank 1 must have read it first (it failed with ENOENT)."""
    out = tmp_path / "exp"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(8)))
    flags = ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
             "--strategy", "expert_iteration", "--prompts_file", str(prompts), "--reward_threshold", "0",
             "--samples_per_prompt", "2", "--max_new_tokens", "4", "--temperature", "1.0", "--num_iterations", "2",
             "--max_steps", "12", "--save_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "4",
             "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "none"]
    job = Job(torchrun_cmd([*flags, "--async_save"], port=free_port()),
              env(**{"ITERTRAIN_FAULT": "checkpoint.commit=sleep:6#2"}))
    try:
        job.wait_for(LOSS, count=4, timeout=240)  # step 8 logged: checkpoint-8's commit is held 6 s
        time.sleep(0.5)
        job.signal_agent(signal.SIGTERM)
        job.wait(timeout=240)
    finally:
        job.kill()
    assert (out / "checkpoint-12" / "itertrain.manifest.json").exists() and not (out / "iter_0").exists(), job.output
    r = torchrun(*flags, "--resume_from", "auto", "--resume_from_iteration", "auto", env=env())
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 0, step 12" in r.stdout
    assert (out / "iter_1" / "itertrain.manifest.json").exists()
