"""Dead ends (states a user could not get out of): everything a launch can check (flags, the data of the iteration about to run,
reward functions, tracker integrations, the output dir itself) is checked before anything is written.
A refused launch exits 2 with one line naming the file or flag, and leaves the output dir
byte-identical (or never creates it). Real processes, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, itertrain, tree_hash

pytestmark = pytest.mark.slow  # real processes: training

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def assert_refused(r, *names: str) -> None:
    assert r.returncode == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("itertrain: error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.stderr
    assert all(n in errors[0] for n in names), errors[0]


@pytest.fixture
def data(tmp_path, train_file):
    """data_{iteration}.jsonl: a good file for iteration 0, and `bad` for iteration 1."""
    (tmp_path / "data_0.jsonl").write_text(train_file.read_text())

    def make(bad: str) -> str:
        (tmp_path / "data_1.jsonl").write_text(bad)
        return str(tmp_path / "data_{iteration}.jsonl")

    return make


BAD_DATA = {
    "malformed_line": ('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": \n', "line 2: not valid JSON"),
    "empty_file": ("", "no training examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_of_the_iteration_about_to_run_is_refused_before_anything_is_written(
        tmp_path, tiny_model, data, case):
    content, message = BAD_DATA[case]
    template = data(content)
    bad = str(tmp_path / "data_1.jsonl")

    def args(out: Path, iterations: int, first: int = 0) -> list[str]:
        return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", template,
                "--num_iterations", str(iterations), *FAST_FLAGS]

    # a new experiment whose first iteration reads the bad file: the directory (and the guide's
    # ./experiments/ above it) is never created
    (tmp_path / "data_0.jsonl").rename(tmp_path / "good.jsonl")
    (tmp_path / "data_0.jsonl").write_text(content)
    new = tmp_path / "experiments" / "new_experiment"
    r = itertrain("train", *args(new, 1))
    assert_refused(r, str(tmp_path / "data_0.jsonl"), message)
    assert not (tmp_path / "experiments").exists()
    (tmp_path / "good.jsonl").replace(tmp_path / "data_0.jsonl")

    # an existing experiment: iteration 0 committed; iteration 1's file is bad
    out = tmp_path / "exp"
    r = itertrain("train", *args(out, 1))
    assert r.returncode == 0, r.output
    before = tree_hash(out)
    r = itertrain("train", *args(out, 2), *AUTO)
    assert_refused(r, bad, message)
    assert tree_hash(out) == before  # no itertrain.json rewrite, no recovery report, lock file as it was
    assert len(list((out / "runs").glob("recovery-*.json"))) == 1


def test_unimportable_reward_function_is_refused_before_iteration_0_trains(tmp_path, tiny_model, train_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "expert_iteration",
                  "--train_file", str(train_file), "--prompts_file", str(prompts), "--num_iterations", "2",
                  "--reward_fn", "no_such_rewards_module:score", *FAST_FLAGS)
    assert_refused(r, "--reward_funcs no_such_rewards_module:score", "cannot import it")
    assert not out.exists()
    assert "stage: train" not in r.stdout


def test_report_to_a_tracker_that_is_not_installed_is_refused_naming_it(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out), "--report_to", "comet_ml")  # wandb and mlflow come with the bootstrap
    assert_refused(r, "--report_to comet_ml", "not installed", "pip install comet_ml")
    assert not out.exists()


def test_output_dir_that_is_a_regular_file_is_refused_with_exit_2(tmp_path, sft_args):
    out = tmp_path / "exp"
    out.write_text("not a directory")
    r = itertrain("train", *sft_args(out))
    assert_refused(r, f"--output_dir {out} is a file")
    assert out.read_text() == "not a directory"
