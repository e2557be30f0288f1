"""A new kind of artifact is one class: registered, discovery lists it, `itertrain verify` checks it and
`itertrain status` shows it, a restart of an earlier iteration moves its later artifacts aside (the plan,
the report, the housekeeping), `--overwrite_output_dir` moves its directory aside, and its commit goes
through the commit worker (manifest written last), as the checkpoint manager's commits do.

Real files, the real commands and the real launch housekeeping (in-process); no training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from itertrain.artifacts import kind as written
from itertrain.artifacts.manager import CheckpointConfig, CheckpointManager
from itertrain.artifacts.manifest import read_header, read_manifest
from itertrain.experiment import SCHEMA_VERSION, foreign_dirs, load_record
from itertrain.layout import EXPERIMENT_RECORD, MANIFEST_NAME, SUPERSEDED_DIR, Entry, parse_iteration_name
from itertrain.recovery import kinds
from itertrain.recovery.discover import Status, discover
from itertrain.recovery.flags import flags_of
from itertrain.recovery.prepare import prepare_output_dir, print_report
from itertrain.recovery.resolve import Resolved, decide_verified
from itertrain.status import status, verify


class EvalScores(kinds.ArtifactKind):
    """A toy kind: `evals/iter_K/scores.json`, the held-out scores of iteration K."""

    name, group, icon = "eval_scores", "evals", "📊"
    follows_training = True  # the scores of iter_K: retraining iteration K replaces them

    def entries(self, scan: kinds.Scan) -> list[Entry]:
        base = scan.root / "evals"
        names = sorted(os.listdir(base)) if base.is_dir() else []
        return [Entry(f"evals/{n}", self.name, k, (base / n).is_symlink())
                for n in names if (k := parse_iteration_name(n)) is not None]

    def check(self, directory: Path) -> list[str]:
        try:
            json.loads((directory / "scores.json").read_text())
        except (OSError, ValueError) as e:
            return [f"scores.json: {e}"]
        return []

    def describe(self, artifact, label: str, in_flight: bool = False) -> str:
        return f"  {self.icon} {artifact.path:<24} scores of iteration {artifact.iteration} {label}"


@pytest.fixture
def toy_kind():
    kind = kinds.register(EvalScores())
    yield kind
    kinds.unregister(kind)


def _experiment(root: Path, kind: EvalScores) -> None:
    root.mkdir()
    (root / EXPERIMENT_RECORD).write_text(json.dumps({"schema": SCHEMA_VERSION, "arguments": {}, "adopted": []}))
    for k in (0, 1):
        d = root / "evals" / f"iter_{k}"
        d.mkdir(parents=True)
        (d / "scores.json").write_text(json.dumps({"accuracy": 0.5 + k / 10}))
    kind.commit(root / "evals" / "iter_0", iteration=0)  # evals/iter_1 is never committed: torn


def test_a_new_artifact_kind_is_one_class_that_discover_verify_and_status_pick_up(tmp_path, toy_kind, capsys):
    root = tmp_path / "exp"
    _experiment(root, toy_kind)
    manifest = read_manifest(root / "evals" / "iter_0")
    assert manifest is not None and manifest.kind == "eval_scores" and "scores.json" in manifest.files

    inv = discover(root)
    assert [(a.path, a.status) for a in inv.group("evals")] == [("evals/iter_0", Status.COMMITTED),
                                                                ("evals/iter_1", Status.TORN)]
    assert "evals/iter_1" in inv.torn  # the next launch removes it, as any save that never completed

    assert status([str(root)]) == 0
    out = capsys.readouterr().out
    assert "📊 evals/iter_0" in out and "scores of iteration 0 committed" in out
    assert "scores of iteration 1 torn" in out
    assert status([str(root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["inventory"]["evals"]
    assert [a["status"] for a in shown] == ["committed", "torn"]

    assert verify([str(root)]) == 0
    assert "1 of 1 artifacts verified" in capsys.readouterr().out
    (root / "evals" / "iter_0" / "scores.json").write_text('{"accuracy": 0.9}')  # same size, other bytes
    assert verify([str(root), "--json"]) == 1
    result = {r["path"]: r for r in json.loads(capsys.readouterr().out)["artifacts"]}
    assert result["evals/iter_0"]["kind"] == "eval_scores" and result["evals/iter_0"]["ok"] is False
    assert "scores.json" in "; ".join(result["evals/iter_0"]["problems"])


def test_an_unregistered_kind_is_invisible_and_a_manifest_of_another_kind_is_corrupt(tmp_path, toy_kind):
    root = tmp_path / "exp"
    _experiment(root, toy_kind)
    kinds.unregister(toy_kind)
    try:
        inv = discover(root)
        assert inv.others == {} and inv.torn == []  # nothing of an unknown kind is ever cleaned up
    finally:
        kinds.register(toy_kind)
    manifest = json.loads((root / "evals" / "iter_0" / MANIFEST_NAME).read_text())
    (root / "evals" / "iter_0" / MANIFEST_NAME).write_text(json.dumps({**manifest, "kind": "data"}))
    evals = discover(root).group("evals")
    assert evals[0].status == Status.CORRUPT and "expected 'eval_scores'" in evals[0].problem
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(EvalScores())


def test_the_built_in_kinds_keep_the_manifest_kind_strings_existing_experiments_hold():
    """Experiments committed before the kinds were classes name these strings in their manifests: a
    renamed kind would make every one of them corrupt."""
    assert [(k.name, k.group) for k in kinds.registered()] == [
        ("iteration_model", "iteration_models"), ("trainer_checkpoint", "checkpoints"), ("data", "data")]


def test_the_built_in_kinds_commit_through_the_same_writing_half_the_checkpoint_manager_uses():
    """The manager (artifacts floor) cannot import recovery's kinds: both share the writing half."""
    built_in = dict(zip(("iteration_models", "checkpoints", "data"),
                        (written.ITERATION_MODEL, written.TRAINER_CHECKPOINT, written.DATA)))
    for kind in kinds.registered():
        assert isinstance(kind, type(built_in[kind.group])) and kind.name == built_in[kind.group].name


def test_the_checkpoint_manager_commits_each_artifact_through_its_kind(tmp_path, monkeypatch):
    jobs = []
    job = written.CommitKind._job

    def spy(self, directory, *args):
        jobs.append((self.name, Path(directory).relative_to(tmp_path).as_posix()))
        return job(self, directory, *args)

    monkeypatch.setattr(written.CommitKind, "_job", spy)
    manager = CheckpointManager(CheckpointConfig(tmp_path))  # checkpoints commit on the background thread
    manager.start_iteration(0, {"weights_from": "base"})
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    manager.commit_checkpoint(5)
    manager.wait()
    (tmp_path / "data" / "iter_0").mkdir(parents=True)
    (tmp_path / "data" / "iter_0" / "train.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    manager.commit_data(tmp_path / "data" / "iter_0", 0, {"weights_from": "base"}, {"samples": 1})
    manager.close()

    assert jobs == [("trainer_checkpoint", "checkpoint-5"), ("data", "data/iter_0")]
    headers = {rel: read_header(str(tmp_path / rel)) for _, rel in jobs}
    assert {rel: (h.kind, h.iteration, h.step) for rel, h in headers.items()} == {
        "checkpoint-5": ("trainer_checkpoint", 0, 5), "data/iter_0": ("data", 0, 0)}


def _model(directory: Path, iteration: int) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(bytes([iteration]) * 64)
    kinds.registered()[0].commit(directory, iteration=iteration)


def _finished(root: Path, kind: EvalScores, iterations: int = 3) -> None:
    """An experiment whose iterations all committed: a model, data (from iteration 1) and scores each."""
    root.mkdir()
    (root / EXPERIMENT_RECORD).write_text(json.dumps({"schema": SCHEMA_VERSION, "arguments": {}, "adopted": []}))
    data_kind = next(k for k in kinds.registered() if k.group == "data")
    for k in range(iterations):
        _model(root / f"iter_{k}", k)
        if k:
            (root / "data" / f"iter_{k}").mkdir(parents=True)
            (root / "data" / f"iter_{k}" / "train.jsonl").write_text(json.dumps({"k": k}) + "\n")
            data_kind.commit(root / "data" / f"iter_{k}", iteration=k)
        (root / "evals" / f"iter_{k}").mkdir(parents=True)
        (root / "evals" / f"iter_{k}" / "scores.json").write_text(json.dumps({"accuracy": k / 10}))
        kind.commit(root / "evals" / f"iter_{k}", iteration=k)


def _launch(root: Path, model_dir: Path, *flags: str) -> tuple[Resolved, dict]:
    """Rank 0's part of a launch up to training: the verified plan, then the housekeeping and report."""
    from itertrain.parser import parse_train_args

    cfg = parse_train_args(["--model_name", str(model_dir), "--output_dir", str(root), "--task", "arithmetic",
                            "--num_iterations", "3", *flags])
    record = load_record(root)
    plan, inv = decide_verified(root, flags_of(cfg), {}, record)
    resolved = Resolved(plan, inv)
    print_report(resolved, cfg, [])
    prepare_output_dir(cfg, resolved, record, CheckpointManager(CheckpointConfig(root)), [])
    report = json.loads(next((root / "runs").glob("recovery-*.json")).read_text())
    return resolved, report


def test_retraining_an_earlier_iteration_moves_a_registered_kinds_later_artifacts_aside_and_reports_them(
        tmp_path, toy_kind, model_dir, capsys):
    root = tmp_path / "exp"
    _finished(root, toy_kind)
    resolved, report = _launch(root, model_dir, "--resume_from_iteration", "iter_0", "--resume_from", "none")

    # Iteration 1 is retrained from iter_0: the models of 1 and later go, data only of later iterations
    # (data/iter_1 is made before iteration 1 trains and is reused), the scores of 1 and later (the kind
    # follows training: scores of a model that is replaced).
    assert resolved.plan.iteration == 1
    assert resolved.plan.supersedes == ("iter_1", "iter_2", "data/iter_2", "evals/iter_1", "evals/iter_2")
    box = capsys.readouterr().out
    assert f"{root / 'evals' / 'iter_2'} will be replaced by this run: moved to superseded/ first" in box
    assert report["plan"]["supersedes"] == list(resolved.plan.supersedes)
    assert [a["path"] for a in report["inventory"]["evals"]] == ["evals/iter_0", "evals/iter_1", "evals/iter_2"]

    [moved] = (root / SUPERSEDED_DIR).iterdir()
    assert sorted(p.relative_to(moved).as_posix() for p in moved.glob("*/iter_*")) == [
        "data/iter_2", "evals/iter_1", "evals/iter_2"]
    assert read_manifest(moved / "evals" / "iter_1").kind == "eval_scores"  # moved whole, never rewritten
    assert [a.path for a in discover(root).group("evals")] == ["evals/iter_0"]
    assert [a.path for a in discover(root).data] == ["data/iter_1"]


def test_a_kind_that_does_not_follow_training_keeps_the_restarted_iterations_artifact(tmp_path, toy_kind):
    root = tmp_path / "exp"
    _finished(root, toy_kind)
    inv = discover(root)
    evals = inv.group("evals")
    assert [toy_kind.superseded(a, 1, 0) for a in evals] == [False, True, True]
    toy_kind.follows_training = False  # an instance attribute: the class keeps True for the other tests
    assert [toy_kind.superseded(a, 1, 0) for a in evals] == [False, False, True]


def test_overwrite_output_dir_moves_a_registered_kinds_directory_aside_with_the_rest(tmp_path, toy_kind, model_dir):
    root = tmp_path / "exp"
    _finished(root, toy_kind, iterations=2)
    resolved, report = _launch(root, model_dir, "--overwrite_output_dir", "--resume_from", "none",
                               "--resume_from_iteration", "none")
    assert resolved.plan.mode.value == "fresh"
    [moved] = (root / SUPERSEDED_DIR).iterdir()
    assert not (root / "evals").exists() and (moved / "evals" / "iter_1" / MANIFEST_NAME).exists()
    assert discover(root).group("evals") == ()  # the new experiment starts without them


def test_a_registered_kinds_directories_are_never_adopted_as_another_tools_work(tmp_path, toy_kind):
    """The adoption list (written when the record is created) names only built-in kinds' directories; a
    registered kind's directory without a manifest is torn inside an experiment and outside one, as data's."""
    (tmp_path / "iter_0").mkdir()
    (tmp_path / "iter_0" / "config.json").write_text("{}")
    (tmp_path / "evals" / "iter_0").mkdir(parents=True)
    (tmp_path / "evals" / "iter_0" / "scores.json").write_text("{}")
    assert foreign_dirs(tmp_path) == ["iter_0"]
    assert [(a.path, a.status) for a in discover(tmp_path).group("evals")] == [("evals/iter_0", Status.TORN)]


def test_overwrite_output_dir_refuses_a_symlinked_registered_kind_directory_before_moving_anything(
        tmp_path, toy_kind, model_dir):
    """`evals/` a symlink to elsewhere: `--overwrite_output_dir` cannot move it aside (never through a
    link), so the launch's up-front check refuses it (exit 2), as it does a symlinked `iter_K`; nothing
    may be moved first (data/ gone, iter_K left: half of an experiment moved aside)."""
    from itertrain.errors import RecoveryRefused
    from itertrain.parser import parse_train_args
    from itertrain.recovery.prepare import check_writes

    root = tmp_path / "exp"
    _finished(root, toy_kind, iterations=2)
    (root / "evals").rename(tmp_path / "evals-elsewhere")
    (root / "evals").symlink_to(tmp_path / "evals-elsewhere")
    before = sorted(p.name for p in root.iterdir())
    cfg = parse_train_args(["--model_name", str(model_dir), "--output_dir", str(root), "--strategy", "sft",
                            "--train_file", str(model_dir / "config.json"), "--num_iterations", "3",
                            "--overwrite_output_dir", "--resume_from", "none", "--resume_from_iteration", "none"])
    plan, _ = decide_verified(root, flags_of(cfg), {}, load_record(root))
    with pytest.raises(RecoveryRefused, match="evals"):
        check_writes(plan, root, cfg, [])  # the launch's check, before anything is written
    assert sorted(p.name for p in root.iterdir()) == before and (root / "evals" / "iter_1" / MANIFEST_NAME).exists()
