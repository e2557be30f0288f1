"""A new kind of artifact is one class: registered, discovery lists it, `itertrain verify` checks it and
`itertrain status` shows it, and its commit goes through the commit worker (manifest written last).

Real files, the real commands (in-process); no training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from itertrain.artifacts.manifest import read_manifest
from itertrain.experiment import SCHEMA_VERSION
from itertrain.layout import EXPERIMENT_RECORD, MANIFEST_NAME, Entry, parse_iteration_name
from itertrain.recovery import kinds
from itertrain.recovery.discover import Status, discover
from itertrain.status import status, verify


class EvalScores(kinds.ArtifactKind):
    """A toy kind: `evals/iter_K/scores.json`, the held-out scores of iteration K."""

    name, group, icon = "eval_scores", "evals", "📊"

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
