"""--sft_max_steps / --sft_learning_rate (expert iteration's SFT iteration 0): what itertrain.json and the
manifests record as iteration 0's hyperparameters, and what a mid-iteration-0 resume with changed values
reports. Real processes, a real kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import arithmetic_files, itertrain, manifest

pytestmark = pytest.mark.slow  # real processes: training, generation, a kill

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def ei_args(tiny_model: Path, d: Path, out: Path, *extra: str) -> list[str]:
    train, prompts = arithmetic_files(d, prompts=8, top=99)
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "expert_iteration",
            "--train_file", str(train), "--prompts_file", str(prompts), "--num_iterations", "2",
            "--samples_per_prompt", "1", "--max_new_tokens", "3", "--generation_batch_size", "8",
            "--reward_threshold", "0", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--report_to", "none", *extra]


def test_iteration_zero_records_and_reports_the_sft_max_steps_and_learning_rate_it_trains_with(tmp_path, tiny_model):
    out = tmp_path / "exp"
    zero = ("--sft_max_steps", "8", "--sft_learning_rate", "5e-4")
    r = itertrain("train", *ei_args(tiny_model, tmp_path, out, *zero), fault="checkpoint.save=kill#3")
    assert r.returncode == -9, r.output  # iteration 0 killed after checkpoint-4 of its 8 steps
    assert manifest(out / "checkpoint-4")["lineage"]["hyperparameters"]["max_steps"] == 8
    assert manifest(out / "checkpoint-4")["lineage"]["hyperparameters"]["learning_rate"] == 5e-4

    # relaunched with a shorter iteration 0 and another --max_steps (which iteration 0 does not use)
    r = itertrain("train", *ei_args(tiny_model, tmp_path, out, "--sft_max_steps", "6", "--sft_learning_rate", "5e-4",
                                    "--max_steps", "3"), *AUTO)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 0, step 4" in r.stdout
    assert "max_steps 8 -> 6: applies now (iteration 0 continues at step 4 and ends at step 6)" in r.stdout
    assert "max_steps 4 -> 3" not in r.stdout.replace("argument changed: max_steps: 4 -> 3", "")
    used = json.loads((out / "itertrain.json").read_text())["iterations"]
    assert (used["0"]["hyperparameters"]["max_steps"], used["0"]["hyperparameters"]["learning_rate"]) == (6, 5e-4)
    assert (used["1"]["hyperparameters"]["max_steps"], used["1"]["hyperparameters"]["learning_rate"]) == (3, 1e-3)
    metrics = [json.loads(x) for x in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["steps"] for m in metrics] == [6, 3]


def test_a_file_where_iteration_zero_saves_a_checkpoint_past_max_steps_is_refused_up_front(tmp_path, tiny_model):
    # iteration 0 runs 8 steps (--sft_max_steps) and saves checkpoint-6 and -8, which the later iterations'
    # --max_steps 4 never reaches: the launch's check must know iteration 0's own length
    out = tmp_path / "exp"
    out.mkdir()
    (out / "checkpoint-6").write_text("not a checkpoint")
    r = itertrain("train", *ei_args(tiny_model, tmp_path, out, "--sft_max_steps", "8"), *AUTO)
    assert r.returncode == 2, r.output
    assert "checkpoint-6" in r.output and "a plain file is in the way" in r.output
    assert "stage: train" not in r.stdout  # refused before iteration 0 trained
    assert (out / "checkpoint-6").read_text() == "not a checkpoint"
