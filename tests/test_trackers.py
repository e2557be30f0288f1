"""Trackers that understand iterations: one run per experiment, kept in itertrain.json and continued by a
relaunch; one step axis across iterations; each iteration's committed metrics logged (real processes)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import PY, base_env, itertrain
from jobs import Job

STEPS = [4, 8, 12, 16, 20, 24, 28, 32, 36]  # 3 iterations of 12 steps, logged every 4


def _tracked(sft_args, out: Path, tracker: str, env: dict[str, str], *extra: str) -> None:
    """3 iterations; the first launch is preempted (SIGTERM) while it trains iteration 1 (it commits a
    checkpoint and exits 143); the same command relaunched with auto/auto finishes the experiment."""
    args = [a if a != "none" else tracker for a in sft_args(out, *extra, iterations=3)]
    held = base_env({**env, "ITERTRAIN_FAULT": "train.step=sleep:300#18"})  # step 6 of iteration 1
    with Job([PY, "-m", "itertrain", "train", *args], held) as job:
        job.wait_for("'loss': ", 4, timeout=600)  # iteration 1's step 4 is logged
        time.sleep(2)
        job.signal_agent(signal.SIGTERM)
        assert job.wait(180) == 143, job.output
    assert (out / "iter_0").is_dir() and not (out / "iter_1").exists()
    again = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto", env=env, timeout=600)
    assert again.returncode == 0, again.output
    assert "(continued)" in again.stdout, again.stdout


def _record_id(out: Path, tracker: str) -> str:
    return json.loads((out / "itertrain.json").read_text())["trackers"][tracker]


@pytest.mark.slow
def test_wandb_offline_one_run_whose_step_continues_across_iterations_and_a_relaunch(tmp_path, sft_args):
    pytest.importorskip("wandb")
    from wandb_offline import run_records

    out = tmp_path / "exp"
    _tracked(sft_args, out, "wandb", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = sorted((out / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one directory per launch ...
    read = [run_records(d) for d in runs]
    assert {run_id for run_id, _ in read} == {_record_id(out, "wandb")}  # ... of the one run itertrain.json names
    rows = [row for _, history in read for row in history]
    losses = [(r["train/global_step"], r["train/iteration"]) for r in rows if "train/loss" in r]
    assert losses == [(s, (s - 1) // 12) for s in STEPS], losses
    committed = [(r["train/global_step"], r["committed/iteration"]) for r in rows if "committed/train_loss" in r]
    assert committed == [(12, 0), (24, 1), (36, 2)], committed


@pytest.mark.slow
def test_mlflow_file_store_one_run_whose_step_continues_across_iterations_and_a_relaunch(tmp_path, sft_args,
                                                                                         monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "exp", f"file://{tmp_path / 'mlruns'}"
    _tracked(sft_args, out, "mlflow", {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"})
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [_record_id(out, "mlflow")]  # one run, the one itertrain.json names
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == STEPS
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "iteration")][-1] == (36, 2)
    assert [m.step for m in client.get_metric_history(run_id, "committed/train_loss")] == [12, 24, 36]


@pytest.mark.slow
def test_tensorboard_step_continues_across_iterations(tmp_path, sft_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "exp"
    args = [a if a != "none" else "tensorboard" for a in sft_args(out, iterations=2)]
    assert itertrain("train", *args, timeout=600).returncode == 0
    steps = []
    for k in (0, 1):
        acc = EventAccumulator(str(next((out / "runs" / "tensorboard" / f"iter_{k}").rglob("events.*")).parent))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")]
    assert steps == STEPS[:6], steps


@pytest.mark.slow
def test_wandb_offline_run_killed_outright_is_continued_under_the_same_id_on_the_same_step_axis(tmp_path, sft_args):
    """SIGKILL (the whole job) as iteration 1 is evaluated: W&B's offline writer loses what it had buffered,
    but the relaunch continues the same run id and logs iteration 1 and 2 at the experiment's steps."""
    pytest.importorskip("wandb")
    from wandb_offline import run_records

    out, env = tmp_path / "exp", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [a if a != "none" else "wandb" for a in sft_args(out, iterations=3)]
    first = itertrain("train", *args, fault="stage.evaluate=kill#2", env=env, timeout=600)
    assert first.returncode != 0 and not (out / "iter_1").exists(), first.output
    again = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto", env=env, timeout=600)
    assert again.returncode == 0 and "(continued)" in again.stdout, again.output
    runs = sorted((out / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(d.name.endswith("-" + _record_id(out, "wandb")) for d in runs), runs
    run_id, rows = run_records(runs[-1])
    assert run_id == _record_id(out, "wandb")
    assert [r["train/global_step"] for r in rows if "train/loss" in r] == STEPS[-3:]  # iteration 2, after 24 steps
    assert [(r["train/global_step"], r["committed/iteration"]) for r in rows if "committed/train_loss" in r] == [
        (24, 1), (36, 2)]


@pytest.mark.slow
def test_an_mlflow_server_that_does_not_answer_is_a_retried_failure_exit_1_not_a_usage_error(tmp_path, sft_args):
    from conftest import free_port

    out = tmp_path / "exp"
    args = [a if a != "none" else "mlflow" for a in sft_args(out, iterations=1)]
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    r = itertrain("train", *args, env=env)
    assert r.returncode == 1, r.output
    assert "itertrain: error: --report_to mlflow: the tracker could not open its run (" in r.stderr, r.output
    assert "torchrun retries" in r.stderr and "Traceback" not in r.stderr, r.output
    assert "stage: train" not in r.stdout


@pytest.mark.slow
def test_an_invalid_run_id_in_itertrain_json_is_refused_naming_the_file_before_anything_is_written(tmp_path,
                                                                                                   sft_args):
    from conftest import tree_hash

    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, iterations=1)).returncode == 0
    record = json.loads((out / "itertrain.json").read_text())
    (out / "itertrain.json").write_text(json.dumps({**record, "trackers": {"mlflow": "bad/id:#?"}}))
    before = tree_hash(out)
    args = [a if a != "none" else "mlflow" for a in sft_args(out, iterations=2)]
    r = itertrain("train", *args, "--resume_from", "auto", "--resume_from_iteration", "auto",
                  env={"MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}"})
    assert r.returncode == 2, r.output
    assert f"itertrain: error: {out / 'itertrain.json'} keeps 'bad/id:#?' as the mlflow run id" in r.stderr, r.output
    assert "delete the \"mlflow\" entry" in r.stderr, r.output
    assert tree_hash(out) == before
