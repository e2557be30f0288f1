"""Unit tests of the experiment layout (names, the scanner, the one ordering) and of manifests
(entries must stay inside their artifact, the fingerprint, the header fast path)."""

from __future__ import annotations

import json
import os

import pytest

from itertrain.artifacts.manifest import ManifestError, commit_directory, fingerprint, read_header, read_manifest
from itertrain.layout import Entry, Kind, checkpoint_order, model_order, rng_state_name, scan
from itertrain.recovery.discover import IterationModel, Status, TrainerCheckpoint


def test_trainer_file_names_are_the_ones_transformers_defines():
    import transformers.trainer as T
    import transformers.utils as U
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from itertrain import layout

    assert layout.TRAINER_STATE_NAME == T.TRAINER_STATE_NAME
    assert layout.OPTIMIZER_NAME == T.OPTIMIZER_NAME
    assert layout.SCHEDULER_NAME == T.SCHEDULER_NAME
    assert layout.SCALER_NAME == T.SCALER_NAME
    assert layout.TRAINING_ARGS_NAME == T.TRAINING_ARGS_NAME
    assert layout.FSDP_MODEL_PREFIX == T.FSDP_MODEL_NAME
    assert layout.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    for name in ("CONFIG_NAME", "GENERATION_CONFIG_NAME", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME",
                 "ADAPTER_CONFIG_NAME", "ADAPTER_SAFE_WEIGHTS_NAME"):
        assert getattr(layout, name) == getattr(U, name), name
    assert rng_state_name(0, 1) == "rng_state.pth" and rng_state_name(1, 2) == "rng_state_1.pth"


def test_scan_lists_artifacts_by_name_including_kept_checkpoints_data_and_symlinks(tmp_path):
    for d in ("checkpoint-4", "checkpoint-x", "iter_0/checkpoint-12", "iter_1", "base_model", "data/iter_1",
              "data/other", "runs", "superseded/20250101/iter_1"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "checkpoint-99").write_text("a file, not a directory")
    os.symlink(tmp_path / "iter_1", tmp_path / "iter_2")
    entries = {e.rel: e for e in scan(tmp_path)}
    assert set(entries) == {"checkpoint-4", "iter_0", "iter_1", "iter_2", "base_model", "iter_0/checkpoint-12",
                            "data/iter_1"}
    assert entries["iter_2"] == Entry("iter_2", Kind.ITERATION_MODEL, 2, True)
    assert entries["base_model"].number == 0 and entries["iter_0/checkpoint-12"].kind == Kind.TRAINER_CHECKPOINT
    assert entries["data/iter_1"].kind == Kind.DATA


def _ckpt(path, iteration, step, foreign=False, mtime=0.0):
    return TrainerCheckpoint(path, step, iteration, Status.COMMITTED, mtime, foreign=foreign)


def test_one_ordering_newest_iteration_then_step_then_top_level_before_kept():
    cands = [_ckpt("checkpoint-40", 1, 40), _ckpt("checkpoint-8", 2, 8), _ckpt("iter_2/checkpoint-8", 2, 8),
             _ckpt("checkpoint-99", 2, 99, foreign=True, mtime=10**10)]
    assert max(cands, key=checkpoint_order).path == "checkpoint-8"  # committed beats foreign in an iteration
    assert sorted(cands, key=checkpoint_order)[0].path == "checkpoint-40"
    models = [IterationModel("base_model", 0, Status.UNVERIFIED, 5.0, foreign=True),
              IterationModel("iter_0", 0, Status.COMMITTED, 1.0)]
    assert max(models, key=model_order).path == "iter_0"


@pytest.mark.parametrize("entry", ["../iter_0/model.safetensors", "/etc/passwd", "a/../../b", "./x", "a//b", "",
                                   "itertrain.manifest.json", "a\\..\\b"])
def test_manifest_entries_outside_their_artifact_make_it_malformed(tmp_path, entry):
    d = tmp_path / "checkpoint-4"
    d.mkdir()
    (d / "x.bin").write_bytes(b"x")
    commit_directory(d, kind="trainer_checkpoint", iteration=0, step=4)
    raw = json.loads((d / "itertrain.manifest.json").read_text())
    raw["files"][entry] = {"size": 1, "xxh3": "0" * 32}
    (d / "itertrain.manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="malformed manifest"):
        read_manifest(d)


def test_header_fast_path_agrees_with_the_full_parse_and_fingerprint_follows_the_manifest(tmp_path):
    d = tmp_path / "iter_3"
    d.mkdir()
    (d / "w.bin").write_bytes(b"w" * 100)
    commit_directory(d, kind="iteration_model", iteration=3, step=12, world_size=2)
    h, m = read_header(str(d)), read_manifest(d)
    assert (h.kind, h.iteration, h.step, h.world_size) == (m.kind, m.iteration, m.step, m.world_size)
    before = fingerprint(d)
    commit_directory(d, kind="iteration_model", iteration=3, step=12, world_size=2)
    assert fingerprint(d) != before  # a new manifest (new created time) is a new identity
    foreign = tmp_path / "base_model"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"abc")
    assert fingerprint(foreign).startswith("files-")
