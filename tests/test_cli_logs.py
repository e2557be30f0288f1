"""The command line explains itself, and the logs, status and plots are what an HF user expects:
--version, help texts, broken pipes, a launcher that started fewer processes than asked, trackers
checked up front, the console log, status --json for automation, one TensorBoard tree, one train_loss."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PY, REPO, base_env, itertrain, tree_hash

pytestmark = pytest.mark.slow  # real processes


def test_version_and_help_of_every_command():
    from itertrain import __version__

    r = itertrain("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"itertrain {__version__}"
    r = itertrain("init-model", "--help")
    assert r.returncode == 0 and "character tokenizer" in r.stdout
    r = itertrain("demo", "--help")
    assert r.returncode == 0 and "Every `itertrain train` flag passes through" in " ".join(r.stdout.split())
    r = itertrain("status", "--help")
    assert r.returncode == 0 and "--resume_from" in r.stdout and "(default auto)" in r.stdout
    assert os.access(REPO / "train_iterative.py", os.X_OK)
    venv = base_env({"PATH": f"{os.path.dirname(PY)}:{os.environ.get('PATH', '')}"})  # an activated venv
    r = subprocess.run([str(REPO / "train_iterative.py"), "--help"], capture_output=True, text=True, env=venv,
                       timeout=120)
    assert r.returncode == 0 and "recovery (the guide's flags)" in r.stdout


def test_status_piped_into_head_ends_quietly(tmp_path, sft_args):
    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, iterations=1)).returncode == 0
    r = subprocess.run(f"{PY} -m itertrain status {out} | head -n 1", shell=True, capture_output=True, text=True,
                       env=base_env(), timeout=120)
    assert r.stdout.count("\n") == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_accelerate_launch_that_starts_one_of_two_processes_is_refused(tmp_path, sft_args):
    out = tmp_path / "exp"
    cmd = [PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_iterative.py"), *sft_args(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=base_env(), timeout=300)
    assert r.returncode != 0
    assert "asked for several processes but started only this one" in r.stderr and "torchrun" in r.stderr
    assert not out.exists()


def test_missing_tracker_is_refused_before_anything_is_written(tmp_path, sft_args):
    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, iterations=1)).returncode == 0
    before = tree_hash(out)
    r = itertrain("train", *sft_args(out, "--report_to", "comet_ml", "--resume_from", "auto",
                                     "--resume_from_iteration", "auto", iterations=2))
    assert r.returncode == 2 and "--report_to comet_ml" in r.stderr and "pip install comet_ml" in r.stderr
    assert "CHECKPOINT RECOVERY SYSTEM" not in r.stdout and "Traceback" not in r.stderr
    assert tree_hash(out) == before


def test_console_log_holds_the_report_and_training_and_a_refusal_leaves_none(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out))
    assert r.returncode == 0, r.output
    logs = sorted((out / "runs").glob("train-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "CHECKPOINT RECOVERY SYSTEM" in text and "stage: train" in text and "experiment complete" in text
    assert "'loss'" in text  # HF Trainer's own log lines are in it too
    r = itertrain("train", *sft_args(out, "--resume_from", "none", "--resume_from_iteration", "none"))
    assert r.returncode == 2
    assert sorted((out / "runs").glob("train-*.log")) == logs


def test_status_json_for_automation(tmp_path, sft_args):
    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out)).returncode == 0
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    assert status["schema"] == 2 and status["live_run"] is None
    assert status["output_dir"] == os.path.abspath(out) and status["num_iterations"] == 2
    assert [m["absolute_path"] for m in status["inventory"]["iteration_models"]] == [
        os.path.join(os.path.abspath(out), f"iter_{k}") for k in (0, 1)]
    assert [row["iteration"] for row in status["iterations"]] == [0, 1]
    assert all("train_loss" in row for row in status["iterations"])
    assert status["created"][:4].isdigit() and "T" in status["created"]
    assert status["plan"]["mode"] == "complete"


def test_status_and_plot_find_the_demos_experiment(tmp_path, sft_args):
    demo = tmp_path / "demo"
    assert itertrain("train", *sft_args(demo / "experiment")).returncode == 0
    r = itertrain("status", str(demo))
    assert r.returncode == 0 and "Experiment COMPLETE" in r.stdout and "demo directory" in r.stderr
    r = itertrain("plot", str(demo))
    assert r.returncode == 0 and (demo / "experiment" / "runs" / "metrics.png").exists()


def test_one_tensorboard_tree_with_eval_tagged_as_eval(tmp_path, sft_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "exp"
    r = itertrain("train", *[a if a != "none" else "tensorboard" for a in sft_args(out, iterations=1)],
                  "--eval_strategy", "steps", "--eval_steps", "4")
    assert r.returncode == 0, r.output
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["tensorboard"], runs  # no HF runs/<date>_<host> beside it
    acc = EventAccumulator(str(next((out / "runs" / "tensorboard" / "iter_0").rglob("events.*")).parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags, tags
    assert not any(t.startswith("train/eval") for t in tags), tags


def test_train_loss_after_a_resume_is_the_iterations_and_names_the_launchs_own(tmp_path, sft_args):
    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, iterations=1), fault="checkpoint.save=kill#2").returncode == -9
    r = itertrain("train", *sft_args(out, "--resume_from", "auto", "--resume_from_iteration", "auto", iterations=1))
    assert r.returncode == 0, r.output
    summary = next(line for line in r.stdout.splitlines() if "'train_loss'" in line)
    metrics = json.loads((out / "runs" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train_loss_this_launch" in summary
    shown = float(summary.split("'train_loss': '")[1].split("'")[0])
    assert abs(shown - metrics["train_loss"]) < 1e-3 * max(1.0, abs(metrics["train_loss"]))


def test_plot_draws_only_what_the_experiment_recorded():
    from itertrain.plot import panels

    sft = [{"iteration": 0, "train_loss": 1.0, "eval_train_loss": 0.9}]
    demo = [{"iteration": 1, "train_loss": 1.0, "accuracy_4digit": 0.5, "acceptance_rate": 0.000125}]
    assert panels(sft) == ["loss"]
    assert panels(demo) == ["accuracy", "loss", "rate"]


def test_plot_draws_plugin_metrics_and_the_sft_and_dpo_losses_as_two_lines():
    from itertrain.plot import loss_series, panels, plugin_keys

    dpo = [{"iteration": 0, "train_loss": 2.0, "exact_match": 0.25, "eval_rewards/chosen": 0.1},
           {"iteration": 1, "train_loss": 0.69, "pairs": 12, "pair_rate": 0.5, "exact_match": 0.5}]
    assert plugin_keys(dpo) == ["exact_match"] and panels(dpo)[-1] == "plugin"
    assert loss_series(dpo) == [("train loss (mean over the iteration), SFT", [2.0, None]),
                                ("train loss (mean over the iteration), DPO", [None, 0.69])]


def test_progress_line_shows_a_count_next_to_its_rate_as_a_fraction():
    from itertrain.metrics import describe_row

    line = describe_row({"iteration": 2, "samples": 280, "accepted": 7, "acceptance_rate": 0.025})
    assert line == "samples=280, accepted=7 distinct kept, acceptance_rate=7/280 passed (2.5 %)"
