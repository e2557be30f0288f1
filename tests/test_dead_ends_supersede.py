"""Dead ends (states a user could not get out of): the guide's third command on an experiment that went further, and a
damaged newest iteration model. Real torchrun (2 ranks, gloo), real SIGKILLs, real files; the
iteration models are compared byte for byte with an uninterrupted run where the rules say they
must be equal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, itertrain, manifest, torchrun, tree_hash

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")
N = 3  # iterations of every experiment in this file


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def args_for(out: Path, tiny_model: Path, train_file: Path) -> list[str]:
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--num_iterations", str(N), *FAST_FLAGS]


def copy_experiment(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGE = {
    "bit_flipped": flip_byte,
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
}


def superseded_copies(out: Path, rel: str) -> list[Path]:
    return sorted((out / "superseded").glob(f"*/{rel}"))


def top_level_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, train_file) -> Path:
    """An uninterrupted 3-iteration run under torchrun: the bytes every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "exp"
    r = torchrun(*args_for(out, tiny_model, train_file))
    assert r.returncode == 0, r.output
    return out


def killed(tmp_path_factory, tiny_model, train_file, name: str, fault: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "exp"
    r = torchrun(*args_for(out, tiny_model, train_file), fault=fault)
    assert r.returncode != 0, r.output
    return out


def assert_identical_to_reference(out: Path, reference: Path, iterations: range) -> None:
    for k in iterations:
        assert sha(out / f"iter_{k}" / "model.safetensors") == sha(reference / f"iter_{k}" / "model.safetensors"), k


def relaunch_until_complete(out: Path, args: list[str]) -> str:
    """auto/auto twice: the first finishes the experiment (exit 0), the second says it is complete."""
    r = torchrun(*args, *AUTO)
    assert r.returncode == 0, r.output
    assert "already committed" not in r.output and "Traceback" not in r.output
    again = itertrain("train", *args, *AUTO)
    assert again.returncode == 0, again.output
    assert "Experiment COMPLETE" in again.stdout and "nothing to do" in again.stdout
    return r.stdout


# ---- item 1 --------------------------------------------------------------------------------------
def test_guides_third_command_on_a_finished_experiment_supersedes_later_iterations_and_retrains(
        reference, tmp_path, tiny_model, train_file):
    out = copy_experiment(reference, tmp_path / "exp")
    args = args_for(out, tiny_model, train_file)
    third = ("--resume_from", "none", "--resume_from_iteration", "iter_1")
    old_iter2 = tree_hash(out / "iter_2")
    kept = {k: tree_hash(out / f"iter_{k}") for k in (0, 1)}

    # status predicts the plan, and writes nothing
    before = tree_hash(out)
    s = itertrain("status", str(out), *third)
    assert s.returncode == 0, s.output
    assert "Continuing at: iteration 2, step 0" in s.stdout
    assert f"📦 {out}/iter_2 will be replaced by this run: moved to superseded/ first" in s.stdout
    assert "this run replaces later work: iter_2" in s.stdout
    plan = json.loads(itertrain("status", str(out), "--json", *third).stdout)["plan"]
    assert plan["supersedes"] == ["iter_2"] and plan["iteration"] == 2
    assert tree_hash(out) == before

    r = torchrun(*args, *third)
    assert r.returncode == 0, r.output
    assert f"📦 {out}/iter_2 will be replaced by this run: moved to superseded/ first" in r.stdout
    assert "already committed" not in r.output and "Traceback" not in r.output
    # the old iter_2 sits intact in superseded/, the new one is committed and verifies
    (moved,) = superseded_copies(out, "iter_2")
    assert tree_hash(moved) == old_iter2
    assert manifest(out / "iter_2")["lineage"]["weights_from"] == "iter_1"
    # trained again by this run, as asked: --resume_from none gives it a fresh training state
    assert manifest(moved)["lineage"]["state_scope"] == "optimizer_moments"
    assert manifest(out / "iter_2")["lineage"]["state_scope"] == "none"
    assert {k: tree_hash(out / f"iter_{k}") for k in (0, 1)} == kept
    assert top_level_checkpoints(out) == [] and not list(out.glob("iter_*/checkpoint-*"))
    assert itertrain("verify", str(out)).returncode == 0
    again = itertrain("train", *args, *AUTO)
    assert again.returncode == 0 and "Experiment COMPLETE" in again.stdout, again.output


# ---- item 2 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_after_last_commit(tmp_path_factory, tiny_model, train_file) -> Path:
    """iter_2 (the last) committed, then SIGKILL before its checkpoints were cleaned up."""
    out = killed(tmp_path_factory, tiny_model, train_file, "after-last", "iteration.after_manifest=kill#3")
    assert top_level_checkpoints(out) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    return out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_last_iteration_model_is_rebuilt_from_its_final_checkpoint_byte_identical(
        killed_after_last_commit, reference, tmp_path, tiny_model, train_file, damage):
    out = copy_experiment(killed_after_last_commit, tmp_path / "exp")
    args = args_for(out, tiny_model, train_file)
    weights = out / "iter_2" / "model.safetensors"
    original = sha(weights)
    assert original == sha(reference / "iter_2" / "model.safetensors")  # kill-anywhere holds before the damage
    DAMAGE[damage](weights)
    damaged = sha(weights)

    log = relaunch_until_complete(out, args)
    assert f"❌ Rejected {out}/iter_2" in log
    assert f"Training state from: {out}/checkpoint-12" in log and "Continuing at: iteration 2, step 12" in log
    assert sha(weights) == original
    assert_identical_to_reference(out, reference, range(N))
    (aside,) = superseded_copies(out, "iter_2/model.safetensors")
    assert sha(aside) == damaged
    assert top_level_checkpoints(out) == []
    assert itertrain("verify", str(out)).returncode == 0


@pytest.fixture(scope="module")
def killed_after_first_commit(tmp_path_factory, tiny_model, train_file) -> Path:
    """iter_0 committed, then SIGKILL before its checkpoints were cleaned up (they stay top level)."""
    out = killed(tmp_path_factory, tiny_model, train_file, "after-first", "iteration.after_manifest=kill#1")
    assert top_level_checkpoints(out) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    return out


@pytest.fixture(scope="module")
def killed_in_second_iteration(tmp_path_factory, tiny_model, train_file) -> Path:
    """iter_0 committed and retired (its final checkpoint kept inside as the carry); SIGKILL while
    iteration 1 saves its first checkpoint."""
    out = killed(tmp_path_factory, tiny_model, train_file, "in-second", "checkpoint.save=kill#4")
    assert top_level_checkpoints(out) == [] and (out / "iter_0" / "checkpoint-12" / "itertrain.manifest.json").exists()
    return out


@pytest.mark.parametrize("where", ["top_level_after_crash", "carry_inside_iter_0"])
def test_damaged_iteration_model_that_is_not_the_last_is_rebuilt_and_the_run_finishes_identical(
        killed_after_first_commit, killed_in_second_iteration, reference, tmp_path, tiny_model, train_file, where):
    src = killed_after_first_commit if where == "top_level_after_crash" else killed_in_second_iteration
    out = copy_experiment(src, tmp_path / "exp")
    args = args_for(out, tiny_model, train_file)
    weights = out / "iter_0" / "model.safetensors"
    original = sha(weights)
    flip_byte(weights)
    damaged = sha(weights)

    log = relaunch_until_complete(out, args)
    assert f"❌ Rejected {out}/iter_0" in log and "Continuing at: iteration 0, step 12" in log
    assert sha(weights) == original  # rebuilt from the final checkpoint, not retrained
    # The rebuilt iteration keeps its final checkpoint's optimizer moments for iteration 1, so the
    # whole experiment equals the uninterrupted one.
    assert_identical_to_reference(out, reference, range(N))
    assert sha(superseded_copies(out, "iter_0/model.safetensors")[0]) == damaged
    assert itertrain("verify", str(out)).returncode == 0


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_iteration_model_without_a_surviving_checkpoint_is_retrained_from_the_previous_one(
        reference, tmp_path, tiny_model, train_file, damage):
    out = copy_experiment(reference, tmp_path / "exp")  # finished: no checkpoint of iteration 2 is left
    args = args_for(out, tiny_model, train_file)
    earlier = {k: tree_hash(out / f"iter_{k}") for k in (0, 1)}
    DAMAGE[damage](out / "iter_2" / "model.safetensors")
    damaged = sha(out / "iter_2" / "model.safetensors")

    log = relaunch_until_complete(out, args)
    assert f"❌ Rejected {out}/iter_2" in log
    assert f"Model weights from: {out}/iter_1" in log and "Continuing at: iteration 2, step 0" in log
    assert manifest(out / "iter_2")["lineage"]["weights_from"] == "iter_1"
    assert {k: tree_hash(out / f"iter_{k}") for k in (0, 1)} == earlier
    assert sha(superseded_copies(out, "iter_2/model.safetensors")[0]) == damaged
    assert itertrain("verify", str(out)).returncode == 0
