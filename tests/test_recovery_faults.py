"""Recovery under damage: the corruption matrix, unsafe pickles, the run lock, and refusals that
leave the output directory byte-for-byte unchanged. Real files, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PY, base_env, itertrain, manifest, torchrun, tree_hash

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model, train_file) -> tuple[Path, list[str]]:
    """A 2-rank experiment killed in iteration 2: iter_0, iter_1 committed; checkpoint-4 and
    checkpoint-8 of iteration 2 committed; killed while about to save checkpoint-12."""
    from conftest import FAST_FLAGS

    out = tmp_path_factory.mktemp("interrupted") / "exp"
    args = ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--num_iterations", "3", *FAST_FLAGS]
    r = torchrun(*args, fault="checkpoint.save=kill#9")
    assert r.returncode != 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"], r.output
    return out, args


@pytest.fixture
def exp(interrupted, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the interrupted experiment (same output_dir flag rewritten)."""
    src, args = interrupted
    dst = tmp_path / "exp"
    shutil.copytree(src, dst, symlinks=True)
    args = [str(dst) if a == str(src) else a for a in args]
    return dst, args


def status_json(out: Path, *flags: str) -> dict:
    r = itertrain("status", str(out), "--json", *flags)
    return json.loads(r.stdout)


def rejected(plan: dict) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in plan["rejected"]}


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_intact_interrupted_experiment_continues_from_newest_checkpoint(exp):
    out, _ = exp
    plan = status_json(out)["plan"]
    assert (plan["mode"], plan["state_from"], plan["iteration"], plan["step"]) == ("checkpoint", "checkpoint-8", 2, 8)
    assert "would throw away 8 steps" in plan["reason"]


CORRUPTIONS = {
    "truncated_safetensors": (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors has 1000 bytes"),
    "zero_byte_optimizer": (lambda d: os.truncate(d / "optimizer.pt", 0), "optimizer.pt has 0 bytes"),
    "garbled_trainer_state": (lambda d: flip_byte(d / "trainer_state.json", 10), "trainer_state.json checksum mismatch"),
    "flipped_byte_in_weights": (lambda d: flip_byte(d / "model.safetensors"), "model.safetensors checksum mismatch"),
    "manifest_missing": (lambda d: (d / "itertrain.manifest.json").unlink(), "no manifest"),
    "manifest_names_missing_file": (lambda d: (d / "rng_state_0.pth").unlink(), "rng_state_0.pth is listed in the manifest but missing"),
    "rng_file_of_rank_1_missing": (lambda d: (d / "rng_state_1.pth").unlink(), "rng_state_1.pth is listed in the manifest but missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_newest_checkpoint_is_rejected_and_auto_falls_back_to_the_older_one(exp, case):
    out, _ = exp
    damage, reason = CORRUPTIONS[case]
    damage(out / "checkpoint-8")
    plan = status_json(out)["plan"]
    assert plan["state_from"] == "checkpoint-4" and plan["step"] == 4, plan
    assert reason in rejected(plan)["checkpoint-8"]
    # without its manifest it is a save that never completed, to verify: reported, not a failure
    assert itertrain("verify", str(out)).returncode == (0 if case == "manifest_missing" else 1)


def test_explicit_damaged_checkpoint_exits_2_and_names_what_exists(exp):
    out, args = exp
    flip_byte(out / "checkpoint-8" / "model.safetensors")
    before = tree_hash(out)
    r = itertrain("train", *args, "--resume_from", "8", "--resume_from_iteration", "auto")
    assert r.returncode == 2, r.output
    assert "checkpoint-8" in r.stderr and "checksum mismatch" in r.stderr
    assert "iter_0 (committed)" in r.stderr and "checkpoint-4" in r.stderr
    assert tree_hash(out) == before


def test_torn_newest_checkpoint_is_removed_and_training_continues_from_the_good_one(exp):
    out, args = exp
    torn = out / "checkpoint-12"
    torn.mkdir()
    shutil.copyfile(out / "checkpoint-8" / "model.safetensors", torn / "model.safetensors")
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "❌ Rejected" in r.stdout and "checkpoint-12: torn" in r.stdout
    assert "removed torn checkpoint-12" in r.stdout
    assert "Continuing at: iteration 2, step 8" in r.stdout
    assert manifest(out / "iter_2")["lineage"]["state_from"] == "checkpoint-8"


def test_optimizer_state_of_the_wrong_shape_is_rejected_before_anything_is_applied(exp):
    from itertrain.artifacts.manifest import commit_directory, read_manifest

    out, args = exp
    ckpt = out / "checkpoint-8"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)  # a different model's moments
    first["exp_avg_sq"] = torch.zeros(3, 3)
    torch.save(state, ckpt / "optimizer.pt")
    old = read_manifest(ckpt)
    commit_directory(ckpt, kind=old.kind, iteration=old.iteration, step=old.step, lineage=old.lineage,
                     world_size=old.world_size)  # correctly committed, but for the wrong model
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "checkpoint-8" in r.stdout and "optimizer state holds tensors of shape [3, 3]" in r.stdout
    assert "Continuing at: iteration 2, step 4" in r.stdout
    assert "no longer bit-identical" in r.stdout  # written by 2 ranks, resumed by 1


def test_missing_config_of_an_iteration_model_is_recreated_from_the_base_model(exp):
    out, args = exp
    (out / "iter_1" / "config.json").unlink()
    inv = status_json(out, "--resume_from", "none")["inventory"]
    assert {m["path"]: m["missing_aux"] for m in inv["iteration_models"]}["iter_1"] == ["config.json"]
    r = itertrain("train", *args, "--resume_from", "none", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "created missing config.json in iter_1" in r.stdout
    assert "Model weights from: " + str(out / "iter_1") in r.stdout
    assert (out / "iter_1" / "config.json").exists()
    assert manifest(out / "iter_1")["extra"]["repaired"] == ["config.json"]
    assert itertrain("verify", str(out)).returncode == 0


def test_a_plan_one_rank_rejects_after_loading_writes_nothing_not_even_the_config_repair(exp):
    """The plan would recreate iter_1's config.json (a copy and a re-commit), but rank 1 then finds its RNG
    state missing: the launch is refused and the directory is byte-for-byte as before (the repair waits
    until every rank accepted the plan)."""
    from itertrain.artifacts.manifest import commit_directory, read_manifest

    out, args = exp
    (out / "iter_1" / "config.json").unlink()
    ckpt = out / "checkpoint-8"
    (ckpt / "rng_state_1.pth").unlink()
    old = read_manifest(ckpt)
    commit_directory(ckpt, kind=old.kind, iteration=old.iteration, step=old.step, lineage=old.lineage,
                     world_size=old.world_size)  # committed as it is: only rank 1 can tell it is unusable
    before = tree_hash(out)
    r = torchrun(*args, "--resume_from", "8", "--resume_from_iteration", "iter_1")
    assert r.returncode != 0 and "exitcode  : 2" in r.output, r.output  # rank 0's exit code, through torchrun
    assert "rank 1: rng_state_1.pth (the RNG state of rank 1) is missing" in r.output, r.output
    assert "created missing config.json" not in r.output
    assert tree_hash(out) == before
    assert not (out / "iter_1" / "config.json").exists()


def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_executed(exp, tmp_path):
    out, args = exp
    # A plain HF Trainer directory (no itertrain manifests): the structural check passes, the load must not.
    foreign = tmp_path / "hf-output"
    foreign.mkdir()
    shutil.copytree(out / "checkpoint-8", foreign / "checkpoint-8")
    (foreign / "checkpoint-8" / "itertrain.manifest.json").unlink()
    marker = tmp_path / "pwned"
    payload = tmp_path / "make_payload.py"
    payload.write_text(
        "import os, sys, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        "torch.save({'state': Evil(), 'param_groups': []}, sys.argv[1])\n"
    )
    subprocess.run([PY, str(payload), str(foreign / "checkpoint-8" / "optimizer.pt")], check=True)
    args = [str(foreign) if a == str(out) else a for a in args]
    r = itertrain("train", *args, "--resume_from", "8", "--resume_from_iteration", "none")
    assert r.returncode == 2, r.output
    assert "optimizer.pt was refused" in r.stderr
    assert not marker.exists()


def test_refused_launches_leave_the_output_dir_byte_for_byte_unchanged(exp, train_file, tmp_path):
    out, args = exp
    before = tree_hash(out)
    other = tmp_path / "other.jsonl"
    other.write_text(train_file.read_text())
    cases = [
        (["--resume_from", "99", "--resume_from_iteration", "auto"], "checkpoint-99 does not exist"),
        (["--resume_from", "auto", "--resume_from_iteration", "iter_7"], "iter_7 does not exist"),
        (["--resume_from", "none", "--resume_from_iteration", "none"], "refusing to start from scratch"),
    ]
    for flags, message in cases:
        r = itertrain("train", *args, *flags)
        assert r.returncode == 2 and message in r.stderr, r.output
        assert tree_hash(out) == before, flags
    changed = [str(other) if a == str(train_file) else a for a in args]
    r = itertrain("train", *changed, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 2 and "train_file" in r.stderr and "--allow_config_change" in r.stderr
    assert tree_hash(out) == before
    r = itertrain("train", *changed, "--resume_from", "auto", "--resume_from_iteration", "auto",
                  "--allow_config_change", "true")
    assert r.returncode == 0, r.output


def _hold_lock(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from itertrain.lock import RunLock; l = RunLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([PY, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=base_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_launch_on_a_locked_dir_exits_3_and_a_killed_holder_never_blocks(exp):
    out, args = exp
    holder = _hold_lock(out)
    try:
        before = tree_hash(out)
        r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
        assert r.returncode == 3, r.output
        assert f"pid {holder.pid} on {os.uname().nodename}, started" in r.stderr
        assert tree_hash(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 2, step 8" in r.stdout


def test_complete_experiment_says_so_and_exits_0(exp):
    out, args = exp
    assert itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto").returncode == 0
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0
    assert "Experiment COMPLETE" in r.stdout and "nothing to do" in r.stdout
