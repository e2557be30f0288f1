"""Two nodes on one machine: two torchrun agents (--nnodes=2, static rendezvous on 127.0.0.1), one
worker each. A run to completion; a node lost mid-iteration; the relaunch; a node-local output dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import base_env, free_port
from jobs import PY, REPO, Job

pytestmark = pytest.mark.slow  # real processes: two torchrun agents, training, kills


def args(out: Path, tiny_model: Path, train_file: Path, *extra: str) -> list[str]:
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--num_iterations", "2", "--max_steps", "24", "--save_steps", "4", "--logging_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--report_to", "none", "--dist_timeout_s", "60", *extra]


def node(rank: int, port: int, flags: list[str], log: Path, wrap: tuple[str, ...] = ()) -> Job:
    """Node `rank` of 2: static rendezvous (node 0's agent hosts the store; see docs/preemption.md, Multi-node)."""
    cmd = [*wrap, PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train_iterative.py"), *flags]
    return Job(cmd, base_env(), log=log)


def run_both(flags: list[str], tmp: Path, name: str) -> tuple[int, int, str]:
    port = free_port()
    with node(0, port, flags, tmp / f"{name}-0.log") as n0, node(1, port, flags, tmp / f"{name}-1.log") as n1:
        rc0, rc1 = n0.wait(900), n1.wait(900)
        return rc0, rc1, n0.output + n1.output


def test_two_nodes_finish_stop_together_when_one_is_lost_and_resume_byte_identically(tmp_path, tiny_model,
                                                                                     train_file):
    reference = tmp_path / "reference"
    rc0, rc1, output = run_both(args(reference, tiny_model, train_file), tmp_path, "reference")
    assert (rc0, rc1) == (0, 0), output

    out = tmp_path / "exp"
    port = free_port()
    flags = args(out, tiny_model, train_file)
    with node(0, port, flags, tmp_path / "lost-0.log") as n0, node(1, port, flags, tmp_path / "lost-1.log") as n1:
        n0.wait_for("stage: train", 2)  # iteration 1 is training
        n0.wait_for(r"\{'loss': ", 4)
        n1.kill()  # node 1 is lost: its agent and its worker, SIGKILLed at once
        rc0 = n0.wait(60 + 120)  # node 0 stops by itself (--dist_timeout_s 60 bounds even a silent loss)
        output = n0.output
    assert rc0 != 0
    # once, naming what rank 0 was doing: training iteration 1, or waiting in one of itertrain's own
    # collectives of that iteration (a checkpoint commit), depending on where the kill landed
    assert output.count("itertrain: error: rank 0 lost contact with another rank while ") == 1, output

    resumed = args(out, tiny_model, train_file, "--resume_from", "auto", "--resume_from_iteration", "auto")
    rc0, rc1, output = run_both(resumed, tmp_path, "resumed")
    assert (rc0, rc1) == (0, 0), output
    assert "Continuing at: iteration 1, step " in output
    for k in range(2):
        assert (out / f"iter_{k}" / "model.safetensors").read_bytes() == \
            (reference / f"iter_{k}" / "model.safetensors").read_bytes()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root or CAP_SYS_ADMIN)")
def test_an_output_dir_that_is_not_shared_by_every_node_is_refused_and_left_unchanged(tmp_path, tiny_model,
                                                                                     train_file):
    """Node 1 runs in a private mount namespace with a tmpfs over the output dir's parent: the same path,
    a different directory (what a node-local disk is)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "exp"
    private = ("unshare", "-m", "--propagation", "private", "sh", "-c", f'mount -t tmpfs tmpfs {shared} && exec "$@"',
               "sh")
    port = free_port()
    flags = args(out, tiny_model, train_file)
    with node(0, port, flags, tmp_path / "n0.log") as n0, node(1, port, flags, tmp_path / "n1.log", private) as n1:
        n0.wait(600), n1.wait(600)
        output = n0.output + n1.output
    assert output.count("exitcode  : 2") == 2, output  # both workers: a usage error
    assert output.count(f"itertrain: error: --output_dir {out} is not the same directory on every node") == 1
    assert "The output dir must be on a file system shared by every node" in output
    assert list(shared.iterdir()) == []  # the check removed its file and the directory it created
