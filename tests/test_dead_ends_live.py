"""Dead ends (states a user could not get out of): a live run and the tools that look at it, Ctrl-C during a background
commit, and writes that fail (a file size limit, a full disk). Real processes, real signals, real
EFBIG and ENOSPC."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, PY, REPO, base_env, itertrain, manifest, tree_hash

pytestmark = pytest.mark.slow  # real processes: training, signals, failing writes

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")
HOST = os.uname().nodename


def spawn(args: list[str], logs: Path, fault: str) -> subprocess.Popen:
    """`python -m itertrain train ARGS` in its own process group (a shell job), output to files."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([PY, "-m", "itertrain", "train", *args], cwd=REPO, start_new_session=True,
                            env=base_env({"ITERTRAIN_FAULT": fault}),
                            stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w"))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def committed(directory: Path) -> bool:
    return (directory / "itertrain.manifest.json").exists()


def status_json(out: Path) -> dict:
    return json.loads(itertrain("status", str(out), "--json").stdout)


# ---- item 11 -------------------------------------------------------------------------------------
def test_ctrl_c_during_a_background_commit_keeps_the_lock_until_the_commit_lands(tmp_path, sft_args):
    out = tmp_path / "exp"
    args = sft_args(out, "--async_commit", "true")
    # checkpoint-4's manifest is written on the commit thread, which is held open here until the test
    # has looked (the release file)
    release = tmp_path / "release"
    proc = spawn(args, tmp_path / "logs", f"manifest.trainer_checkpoint.before=hold:{release}#1")
    try:
        wait_for(lambda: (out / "checkpoint-4" / "trainer_state.json").exists(), proc)
        during = status_json(out)
        assert during["live_run"]["pid"] == proc.pid and during["live_run"]["host"] == HOST
        assert {c["path"]: c["status"] for c in during["inventory"]["checkpoints"]}["checkpoint-4"] == "in_flight"
        assert not committed(out / "checkpoint-4")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        # interrupted, but the commit is still being written: the lock is still held
        after = status_json(out)
        assert not committed(out / "checkpoint-4")
        assert after["live_run"]["pid"] == proc.pid
        release.touch()  # the commit lands, then the run exits
        assert proc.wait(timeout=240) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "logs" / "stderr").read_text()
    assert err.count("itertrain: interrupted") == 1 and "Traceback" not in err, err
    assert committed(out / "checkpoint-4") and manifest(out / "checkpoint-4")["step"] == 4
    verified = json.loads(itertrain("verify", str(out), "--json").stdout)
    assert {a["path"]: a["ok"] for a in verified["artifacts"]}["checkpoint-4"] is True
    assert verified["live_run"] is None
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 0, r.output
    assert f"Training state from: {out}/checkpoint-4" in r.stdout and "Continuing at: iteration 0, step 4" in r.stdout


# ---- item 12 -------------------------------------------------------------------------------------
def test_status_and_verify_during_a_live_run_name_the_holder_and_show_the_save_in_progress(tmp_path, sft_args):
    out = tmp_path / "exp"
    # inside the save of checkpoint-8: its weights are written, its optimizer is not yet (held until the
    # tools have looked: the release file)
    release = tmp_path / "release"
    proc = spawn(sft_args(out), tmp_path / "logs", f"checkpoint.optimizer=hold:{release}#2")
    try:
        wait_for(lambda: (out / "checkpoint-8" / "model.safetensors").exists(), proc)
        started = json.loads((out / ".itertrain.lock").read_text())["started"]
        s = itertrain("status", str(out))
        assert s.returncode == 0, s.output
        assert f"🔒 a run is alive here: pid {proc.pid} on {HOST}, started {started}" in s.stdout
        line = next(ln for ln in s.stdout.splitlines() if "checkpoint-8" in ln and "📁" in ln)
        assert "being written" in line and "torn" not in line, line
        v = itertrain("verify", str(out))
        assert v.returncode == 0, v.output
        assert f"pid {proc.pid} on {HOST}, started {started}" in v.stdout
        assert "⏳ checkpoint-8" in v.stdout and "being written" in v.stdout
        for command in ("status", "verify"):
            j = json.loads(itertrain(command, str(out), "--json").stdout)
            assert j["live_run"] == {"pid": proc.pid, "host": HOST, "started": started}, command
        assert not committed(out / "checkpoint-8")
        release.touch()
        assert proc.wait(timeout=300) == 0  # the tools never disturbed the run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert itertrain("verify", str(out)).returncode == 0


# ---- item 13 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory, tiny_model, train_file) -> Path:
    out = tmp_path_factory.mktemp("one") / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                  "--num_iterations", "1", *FAST_FLAGS)
    assert r.returncode == 0, r.output
    return out


def run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as the kernel reports it."""
    return subprocess.run([PY, "-m", "itertrain", "train", *args], cwd=REPO, env=base_env(), capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def run_on_a_small_tmpfs(base: Path, work: Path, args_at) -> dict[str, str]:
    """In a private mount namespace: a tmpfs with room for the experiment and ~5 MB more; the launch
    fails on a full disk; verify; the tmpfs grows (space freed) and the same command resumes. Returns
    each step's output; the experiment is copied out to work/exp."""
    mnt = work / "mnt"
    mnt.mkdir()
    logs = work / "logs"
    logs.mkdir()
    size_kb = (sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) >> 10) + 5 * 1024
    exp = mnt / "exp"
    train = " ".join(f"'{a}'" for a in [PY, "-m", "itertrain", "train", *args_at(exp), *AUTO])
    script = f"""
        mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && cp -a {base} {exp} || exit 99
        {train} > {logs}/out1 2> {logs}/err1; echo $? > {logs}/rc1
        {PY} -m itertrain verify {exp} --json > {logs}/verify 2>&1
        mount -o remount,size=64m {mnt}
        {train} > {logs}/out2 2> {logs}/err2; echo $? > {logs}/rc2
        cp -a {exp} {work}/exp
    """
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=base_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return {p.name: p.read_text() for p in logs.iterdir()}


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


CASES = {
    # between the weights (~3.5 MB) and the optimizer (~7 MB): torch's archive writer fails inside HF's save
    "optimizer_at_the_file_size_limit": ("optimizer.pt): a file reached the file size limit", 5_000_000),
    # below the weights: safetensors fails
    "weights_at_the_file_size_limit": ("checkpoint-4: a file reached the file size limit", 1_000_000),
    "disk_full": ("checkpoint-4: the disk is full (ENOSPC)", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_failed_write_ends_in_one_line_naming_the_path_and_the_cause_and_the_next_launch_resumes(
        one_iteration, tmp_path, tiny_model, train_file, case):
    expected, limit = CASES[case]

    def args_at(out: Path) -> list[str]:
        return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                "--num_iterations", "2", *FAST_FLAGS]

    if limit is None:
        if not _can_mount_tmpfs():
            pytest.skip("no private mount namespace with tmpfs here (needs root and unshare -m)")
        logs = run_on_a_small_tmpfs(one_iteration, tmp_path, args_at)
        out = tmp_path / "exp"
        failed = (int(logs["rc1"]), logs["err1"])
        verified = json.loads(logs["verify"])
        resumed = (int(logs["rc2"]), logs["out2"] + logs["err2"])
        where = tmp_path / "mnt" / "exp"
    else:
        out = tmp_path / "exp"
        shutil.copytree(one_iteration, out)
        r = run_with_file_size_limit([*args_at(out), *AUTO], limit)
        failed = (r.returncode, r.stderr)
        verified = json.loads(itertrain("verify", str(out), "--json").stdout)
        before = tree_hash(out / "iter_0")
        r = itertrain("train", *args_at(out), *AUTO)
        resumed = (r.returncode, r.output)
        assert tree_hash(out / "iter_0") == before
        where = out

    code, err = failed
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("itertrain: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"could not write {where}/" in errors[0] and expected in errors[0], errors[0]
    # the committed iteration model is intact; the half-written checkpoint is not committed
    assert {a["path"]: a["ok"] for a in verified["artifacts"]}["iter_0"] is True, verified
    code, log = resumed
    assert code == 0, log
    assert "Continuing at: iteration 1, step 0" in log and "removed torn checkpoint-4" in log
    assert manifest(out / "iter_1")["lineage"]["weights_from"] == "iter_0"
