"""Dead ends (states a user could not get out of): a corrupt experiment record, symbolic links, and manifest entries that
leave their artifact. Each either works read-only or is refused before anything is written (exit 2,
the output dir byte-identical). Real runs, real files, real links."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import itertrain, manifest, tree_hash

pytestmark = pytest.mark.slow  # real processes: training, kills

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def killed_at(tmp_path_factory, sft_args_factory, name: str, fault: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "exp"
    r = itertrain("train", *sft_args_factory(out), fault=fault)
    assert r.returncode == -9, r.output
    return out


@pytest.fixture(scope="module")
def args_factory(tiny_model, train_file):
    from conftest import FAST_FLAGS

    def make(out: Path, *extra: str) -> list[str]:
        return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                "--num_iterations", "2", *FAST_FLAGS, *extra]

    return make


@pytest.fixture(scope="module")
def carry_state(tmp_path_factory, args_factory) -> Path:
    """iter_0 committed with its final checkpoint inside (the carry); killed at iteration 1's first save."""
    out = killed_at(tmp_path_factory, args_factory, "carry", "checkpoint.save=kill#4")
    assert (out / "iter_0" / "checkpoint-12" / "itertrain.manifest.json").exists()
    return out


@pytest.fixture(scope="module")
def mid_state(tmp_path_factory, args_factory) -> Path:
    """iter_0 committed; iteration 1's checkpoint-4 and checkpoint-8 committed; killed saving checkpoint-12."""
    out = killed_at(tmp_path_factory, args_factory, "mid", "checkpoint.save=kill#6")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    return out


@pytest.fixture
def copy_of(tmp_path, args_factory):
    def make(src: Path) -> tuple[Path, list[str]]:
        out = tmp_path / "exp"
        shutil.copytree(src, out, symlinks=True)
        return out, args_factory(out)

    return make


def status_json(out: Path, *flags: str) -> dict:
    r = itertrain("status", str(out), "--json", *flags)
    return json.loads(r.stdout)


def assert_refused_unchanged(r, out: Path, before: dict, *names: str) -> None:
    assert r.returncode == 2, r.output
    assert r.stderr.count("itertrain: error:") == 1 and "Traceback" not in r.output, r.stderr
    assert "symbolic link" in r.stderr and all(n in r.stderr for n in names), r.stderr
    assert tree_hash(out) == before


def link_outside(out: Path, rel: str, outside: Path) -> Path:
    """Move `out/rel` to `outside` and put a symlink in its place (as a user moving data to other storage)."""
    shutil.move(str(out / rel), str(outside))
    os.symlink(outside, out / rel)
    return outside


# ---- item 6 --------------------------------------------------------------------------------------
def test_corrupt_experiment_record_is_refused_with_exit_2_by_train_status_and_verify(mid_state, copy_of):
    out, args = copy_of(mid_state)
    record = out / "itertrain.json"
    record.write_text(record.read_text()[:40])  # torn in the middle
    before = tree_hash(out)
    for r in (itertrain("train", *args, *AUTO), itertrain("status", str(out)), itertrain("status", str(out), "--json"),
              itertrain("verify", str(out))):
        assert r.returncode == 2, r.output
        assert f"itertrain: error: {record} is unreadable" in r.stderr and "Traceback" not in r.output, r.stderr
        assert tree_hash(out) == before


# ---- item 9 --------------------------------------------------------------------------------------
def test_symlinked_iteration_model_is_listed_and_used_read_only(carry_state, copy_of, tmp_path):
    out, args = copy_of(carry_state)
    target = link_outside(out, "iter_0", tmp_path / "elsewhere" / "iter_0")
    inside = tree_hash(target)

    s = itertrain("status", str(out))
    assert s.returncode == 0, s.output
    assert any(line.split()[1:2] == ["iter_0"] and "committed (symlink)" in line for line in s.stdout.splitlines()), s.stdout
    models = {m["path"]: m for m in status_json(out)["inventory"]["iteration_models"]}
    assert models["iter_0"]["symlink"] is True and models["iter_0"]["status"] == "committed"
    v = json.loads(itertrain("verify", str(out), "--json").stdout)
    assert {a["path"]: (a["ok"], a["symlink"]) for a in v["artifacts"]}["iter_0"] == (True, True)

    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 0, r.output
    assert f"Model weights from: {out}/iter_0" in r.stdout and "Continuing at: iteration 1, step 0" in r.stdout
    assert os.readlink(out / "iter_0") == str(target)
    assert tree_hash(target) == inside  # its carry checkpoint included: nothing deleted through the link
    assert manifest(out / "iter_1")["lineage"]["weights_from"] == "iter_0"
    assert itertrain("verify", str(out)).returncode == 0


def test_symlinked_checkpoint_the_run_must_save_into_is_refused_up_front(mid_state, copy_of, tmp_path):
    out, args = copy_of(mid_state)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("the user's own files")
    os.symlink(elsewhere, out / "checkpoint-12")  # the run continues at step 8 and saves checkpoint-12
    before, outside = tree_hash(out), tree_hash(elsewhere)
    r = itertrain("train", *args, *AUTO)
    assert_refused_unchanged(r, out, before, "checkpoint-12")
    assert tree_hash(elsewhere) == outside and os.path.islink(out / "checkpoint-12")


@pytest.mark.parametrize("linked", ["iter_0", "superseded"])
def test_overwrite_output_dir_with_a_symlinked_artifact_is_refused_before_anything_moves(
        mid_state, copy_of, tmp_path, linked):
    out, args = copy_of(mid_state)
    if linked == "superseded":
        (tmp_path / "aside").mkdir()
        os.symlink(tmp_path / "aside", out / "superseded")
    else:
        link_outside(out, "iter_0", tmp_path / "elsewhere" / "iter_0")
    before, names = tree_hash(out), sorted(os.listdir(out))
    outside = tree_hash(tmp_path / ("aside" if linked == "superseded" else "elsewhere"))
    r = itertrain("train", *args, "--overwrite_output_dir", "true", "--resume_from", "none",
                  "--resume_from_iteration", "none")
    assert_refused_unchanged(r, out, before, linked)
    assert sorted(os.listdir(out)) == names  # nothing moved, half or whole
    assert tree_hash(tmp_path / ("aside" if linked == "superseded" else "elsewhere")) == outside


def test_runs_symlink_is_refused_before_anything_is_written_outside(mid_state, copy_of, tmp_path):
    out, args = copy_of(mid_state)
    outside = link_outside(out, "runs", tmp_path / "elsewhere-runs")
    before, written = tree_hash(out), tree_hash(outside)
    r = itertrain("train", *args, *AUTO)
    assert_refused_unchanged(r, out, before, "runs")
    assert tree_hash(outside) == written
    # the lock file is never opened through a link either
    os.unlink(out / "runs")
    lock_target = tmp_path / "lock-target"
    lock_target.write_text("")
    (out / ".itertrain.lock").unlink(missing_ok=True)
    os.symlink(lock_target, out / ".itertrain.lock")
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.output, r.output
    assert lock_target.read_text() == ""


# ---- item 10 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["parent", "absolute"])
def test_manifest_entry_outside_its_artifact_is_malformed_and_auto_falls_back(mid_state, copy_of, entry):
    out, args = copy_of(mid_state)
    path = out / "checkpoint-8" / "itertrain.manifest.json"
    m = json.loads(path.read_text())
    # A real file with its true size and checksum: only the entry's place makes it wrong.
    real = m["files"]["model.safetensors"]
    rel = "../checkpoint-4/model.safetensors" if entry == "parent" else str(out / "checkpoint-4" / "model.safetensors")
    m["files"][rel] = json.loads(json.dumps(manifest(out / "checkpoint-4")["files"]["model.safetensors"]))
    assert real  # the manifest is otherwise intact
    path.write_text(json.dumps(m, indent=2))

    plan = status_json(out)["plan"]
    reasons = {r["path"]: r["reason"] for r in plan["rejected"]}
    assert "malformed manifest" in reasons["checkpoint-8"] and repr(rel) in reasons["checkpoint-8"], reasons
    assert (plan["state_from"], plan["step"]) == ("checkpoint-4", 4)
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 0, r.output
    assert f"❌ Rejected {out}/checkpoint-8" in r.stdout and "malformed manifest" in r.stdout
    assert "Continuing at: iteration 1, step 4" in r.stdout
    assert manifest(out / "iter_1")["lineage"]["state_from"] == "checkpoint-4"
    assert list((out / "superseded").glob("*/checkpoint-8"))  # moved aside when its name was needed, not deleted


def test_overwrite_output_dir_with_a_symlinked_data_directory_is_refused_before_anything_moves(
        mid_state, copy_of, tmp_path):
    """data/ is moved aside whole by --overwrite_output_dir (as a registered kind's directory is): a link
    there was found only half-way through the moves (checkpoint-4, checkpoint-8 already aside, a traceback)."""
    out, args = copy_of(mid_state)
    (tmp_path / "elsewhere-data").mkdir()
    (tmp_path / "elsewhere-data" / "notes.txt").write_text("the user's\n")
    os.symlink(tmp_path / "elsewhere-data", out / "data")
    before, names, outside = tree_hash(out), sorted(os.listdir(out)), tree_hash(tmp_path / "elsewhere-data")
    r = itertrain("train", *args, "--overwrite_output_dir", "true", "--resume_from", "none",
                  "--resume_from_iteration", "none")
    assert_refused_unchanged(r, out, before, "data")
    assert sorted(os.listdir(out)) == names  # nothing moved, half or whole
    assert tree_hash(tmp_path / "elsewhere-data") == outside


def test_a_file_where_the_run_must_write_an_iteration_model_is_refused_up_front(mid_state, copy_of):
    """A plain file named iter_1 (no artifact: status does not list it) where iteration 1's model goes:
    refused before anything is written (exit 2), not found by the commit after a whole iteration of training."""
    out, args = copy_of(mid_state)
    (out / "iter_1").write_text("not a model\n")
    before = tree_hash(out)
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 2, r.output
    assert r.stderr.count("itertrain: error:") == 1 and "Traceback" not in r.output, r.stderr
    assert "iter_1" in r.stderr and "not a directory" in r.stderr, r.stderr
    assert tree_hash(out) == before
