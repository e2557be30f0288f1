"""--push_to_hub: each committed iteration model is pushed as revision iter_K after its commit; a failed
upload is reported, training goes on, and it is retried after the next commit (HfApi faked: tests/fake_hub.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import PY, _run, base_env

FAKE = Path(__file__).resolve().parent / "fake_hub.py"


@pytest.mark.slow
def test_push_to_hub_pushes_each_committed_iteration_and_retries_a_failed_upload_at_the_next_commit(
        tmp_path, sft_args):
    out, calls = tmp_path / "exp", tmp_path / "calls.jsonl"
    args = sft_args(out, "--push_to_hub", "--hub_model_id", "me/tiny-iter", iterations=3)
    r = _run([PY, str(FAKE), str(calls), "iter_1", "train", *args], base_env(), 600, tmp_path)
    assert r.returncode == 0, r.output
    assert r.stdout.count("push to the Hub (me/tiny-iter) failed: fake network failure uploading iter_1") == 1
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    uploads = [(c["call"], c["revision"]) for c in log if c["call"].startswith("upload")]
    assert uploads == [("upload_folder", "iter_0"), ("upload_failed", "iter_1"), ("upload_folder", "iter_1"),
                       ("upload_folder", "iter_2")], uploads
    sent = [c for c in log if c["call"] == "upload_folder"]
    assert all(c["committed"] and "model.safetensors" in c["files"] for c in sent), sent
    assert not [f for c in sent for f in c["files"] if "checkpoint-" in f], sent  # the model, not the carried moments
    assert not [c for c in log if c.get("revision") in (None, "main") and c["call"] == "upload_folder"]
    record = json.loads((out / "itertrain.json").read_text())
    assert record["hub"]["repo_id"] == "me/tiny-iter"
    assert record["hub"]["pushed"] == {f"iter_{k}": f"commit-of-iter_{k}" for k in range(3)}
    again = _run([PY, str(FAKE), str(calls), "", "train", *args, "--resume_from", "auto", "--resume_from_iteration",
                  "auto"], base_env(), 600, tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.output
    assert len(calls.read_text().splitlines()) == len(log)  # a relaunch pushes nothing twice


def test_an_iteration_retrained_after_its_push_is_pushed_again(tmp_path, sft_args):
    out, calls = tmp_path / "exp", tmp_path / "calls.jsonl"
    args = sft_args(out, "--push_to_hub", "--hub_model_id", "me/tiny-iter", iterations=2)
    r = _run([PY, str(FAKE), str(calls), "", "train", *args], base_env(), 600, tmp_path)
    assert r.returncode == 0, r.output
    # the guide's third command: iteration 1 is trained again from iter_0 (the old iter_1 is superseded)
    r = _run([PY, str(FAKE), str(calls), "", "train", *args, "--resume_from", "none", "--resume_from_iteration",
              "iter_0"], base_env(), 600, tmp_path)
    assert r.returncode == 0, r.output
    uploads = [c["revision"] for c in map(json.loads, calls.read_text().splitlines()) if c["call"] == "upload_folder"]
    assert uploads == ["iter_0", "iter_1", "iter_1"], uploads
    assert "iter_1 pushed to the Hub" in r.stdout, r.output
