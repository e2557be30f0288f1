"""Kill-anywhere guarantee: the crash harness, faults that are not kills, world-size changes."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, base_env, itertrain, manifest, torchrun, tree_hash
from itertrain.preemption import DUPLICATE_WINDOW_S

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills


@pytest.mark.parametrize("point,errno_name,text,extra", [
    ("checkpoint.optimizer", "enospc", "the disk is full (ENOSPC)", ()),
    ("manifest.trainer_checkpoint.write", "eio", "an I/O error occurred (EIO)", ()),
    ("iteration.before_manifest", "enospc", "the disk is full (ENOSPC)", ()),
    ("checkpoint.save", "erofs", "not writable (EROFS)", ()),
    ("checkpoint.optimizer", "enospc", "the disk is full (ENOSPC)", ("--async_save",)),  # in the writer thread
    ("checkpoint.write.optimizer", "eio", "an I/O error occurred (EIO)", ("--async_save",)),  # in the writer
])
def test_failed_write_exits_1_keeps_committed_artifacts_and_the_next_launch_resumes(tmp_path, sft_args, point,
                                                                                    errno_name, text, extra):
    out = tmp_path / "exp"
    hit = 1 if point.startswith("iteration") else 2
    r = itertrain("train", *sft_args(out, *extra), fault=f"{point}={errno_name}#{hit}")
    assert r.returncode == 1, r.output
    assert text in r.stderr and "Traceback" not in r.stderr
    committed = sorted(p.name for p in out.glob("checkpoint-*") if (p / "itertrain.manifest.json").exists())
    assert committed, "the checkpoints committed before the failure are kept"
    # Intact: every byte still matches the checksums their manifests recorded before the failure.
    report = json.loads(itertrain("verify", str(out), "--json").stdout)
    assert {a["path"]: a["ok"] for a in report["artifacts"] if a["path"] in committed} == dict.fromkeys(committed, True)
    before = {name: tree_hash(out / name) for name in committed}
    r = itertrain("train", *sft_args(out), "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    resumed = [name for name in before if f"Found trainer checkpoint: {out}/{name}" in r.stdout]
    assert resumed == [max(committed, key=lambda n: int(n.split('-')[1]))]
    assert itertrain("verify", str(out)).returncode == 0


def _interrupt_while_writing(tmp_path, sft_args, times: int):
    """Ctrl-C (SIGINT) while the --async_save writer is held before optimizer.pt of checkpoint-8."""
    import os
    import signal
    import time

    from conftest import PY

    out = tmp_path / "exp"
    proc = subprocess.Popen([PY, "-m", "itertrain", "train", *sft_args(out, "--async_save", iterations=1)], cwd=REPO,
                            env=base_env({"ITERTRAIN_FAULT": "checkpoint.write.optimizer=sleep:12#2"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-8" / "model.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    err = ""
    if times == 2:  # once itertrain says it is finishing the write: the second Ctrl-C abandons it
        assert proc.stderr is not None
        for line in proc.stderr:
            err += line
            if "finishing the background write of checkpoint-8" in line:
                time.sleep(DUPLICATE_WINDOW_S + 0.5)  # a Ctrl-C within the window is the same press
                os.kill(proc.pid, signal.SIGINT)
                break
    stdout, rest = proc.communicate(timeout=240)
    return out, proc.returncode, stdout, err + rest


def test_ctrl_c_while_the_async_writer_is_mid_file_finishes_and_commits_that_checkpoint(tmp_path, sft_args):
    out, rc, stdout, stderr = _interrupt_while_writing(tmp_path, sft_args, times=1)
    assert rc == 130, stdout + stderr
    assert "finishing the background write of checkpoint-8" in stderr and "Traceback" not in stderr
    assert manifest(out / "checkpoint-8")["step"] == 8  # a snapshot is a whole checkpoint: committed
    assert itertrain("verify", str(out)).returncode == 0
    r = itertrain("train", *sft_args(out, "--async_save", iterations=1), "--resume_from", "auto",
                  "--resume_from_iteration", "auto")
    assert r.returncode == 0 and "Continuing at: iteration 0, step 8" in r.stdout, r.output
    ref = tmp_path / "ref"
    assert itertrain("train", *sft_args(ref, iterations=1)).returncode == 0  # never interrupted, synchronous saves
    assert (out / "iter_0" / "model.safetensors").read_bytes() == (ref / "iter_0" / "model.safetensors").read_bytes()


def test_second_ctrl_c_abandons_the_async_write_and_the_previous_checkpoint_is_used(tmp_path, sft_args):
    out, rc, stdout, stderr = _interrupt_while_writing(tmp_path, sft_args, times=2)
    assert rc == 130, stdout + stderr
    assert "abandoned the background write of checkpoint-8" in stderr and "Traceback" not in stderr
    assert not (out / "checkpoint-8" / "itertrain.manifest.json").exists()  # never committed half-written
    assert manifest(out / "checkpoint-4")["step"] == 4
    r = itertrain("train", *sft_args(out, "--async_save", iterations=1), "--resume_from", "auto",
                  "--resume_from_iteration", "auto")
    assert r.returncode == 0 and "Continuing at: iteration 0, step 4" in r.stdout, r.output
    assert itertrain("verify", str(out)).returncode == 0


def test_world_size_change_2_to_1_and_back_completes_with_a_warning(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = torchrun(*sft_args(out, iterations=3), fault="checkpoint.save=kill#2")
    assert manifest(out / "checkpoint-4")["world_size"] == 2
    r = itertrain("train", *sft_args(out, iterations=3), "--resume_from", "auto", "--resume_from_iteration", "auto",
                  fault="checkpoint.save=kill#5")
    assert "Continuing at: iteration 0, step 4" in r.stdout
    assert "written by 2 rank(s), this run has 1" in r.stdout and "no longer bit-identical" in r.stdout
    assert manifest(out / "checkpoint-4")["world_size"] == 1  # iteration 1's first checkpoint, by 1 rank
    r = torchrun(*sft_args(out, iterations=3), "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "written by 1 rank(s), this run has 2" in r.stdout
    # iteration 0 finished on 1 rank; iteration 1 was resumed (and finished) on 2, like iteration 2
    assert [manifest(out / f"iter_{k}")["world_size"] for k in range(3)] == [1, 2, 2]


def test_lock_file_in_a_read_only_location_is_a_clear_error(tmp_path, sft_args, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    (out / ".itertrain.lock").mkdir()  # cannot be opened as a file: the lock cannot be taken
    r = itertrain("train", *sft_args(out))
    assert r.returncode == 1
    assert "could not write" in r.stderr and "nothing was changed" in r.stderr and "Traceback" not in r.stderr


def test_output_dir_turned_read_only_mid_run_fails_in_one_line_and_keeps_committed_work(tiny_model, train_file):
    """A real permission failure (the run is not root, so permission bits apply): the directory becomes
    read-only while iteration 1 trains; its first save fails with exit 1 and one line naming the path
    and the cause; iter_0 stays intact; once writable again, a relaunch finishes."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from conftest import FAST_FLAGS, PY

    work = Path(tempfile.mkdtemp(prefix="itertrain-ro-", dir="/tmp"))
    try:
        os.chmod(work, 0o777)
        shutil.copytree(tiny_model, work / "tiny")
        shutil.copy(train_file, work / "train.jsonl")
        subprocess.run(["chmod", "-R", "a+rwX", str(work)], check=True)
        out = work / "exp"
        args = ["--model_name", str(work / "tiny"), "--output_dir", str(out), "--train_file", str(work / "train.jsonl"),
                "--num_iterations", "2", *FAST_FLAGS]
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "itertrain", "train"]
        env = base_env({"ITERTRAIN_FAULT": "stage.train=sleep:6#2", "HOME": str(work)})
        proc = subprocess.Popen([*as_nobody, *args], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:  # iteration 1 is about to train (held for 6 s by the sleep fault)
            if "iter_1 of iter_0..iter_1 · stage: train" in line:
                break
        before = tree_hash(out / "iter_0")
        subprocess.run(["chmod", "-R", "a-w", str(out)], check=True)  # while iteration 1 waits to train
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 1, stdout + stderr
        assert "could not write" in stderr and "not writable (EACCES)" in stderr and "Traceback" not in stderr
        assert stderr.count("itertrain: error:") == 1, stderr
        assert tree_hash(out / "iter_0") == before
        subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)
        r = subprocess.run([*as_nobody, *args, "--resume_from", "auto", "--resume_from_iteration", "auto"], cwd=work,
                           env=base_env({"HOME": str(work)}), capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (out / "iter_1" / "itertrain.manifest.json").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)
