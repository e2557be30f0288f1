"""expert_iteration: stage-level resume of generated data, reward-function errors, rank-independence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, arithmetic_files, itertrain, manifest, torchrun

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills


@pytest.fixture(scope="module")
def ei_files(tmp_path_factory) -> tuple[Path, Path]:
    return arithmetic_files(tmp_path_factory.mktemp("ei"), prompts=20, top=500)


@pytest.fixture
def ei_args(tiny_model, ei_files):
    train, prompts = ei_files

    def make(out: Path, *extra: str) -> list[str]:
        # reward_threshold 0 accepts every sample: the untrained model is rarely right, and these tests
        # are about the data pipeline, not about learning.
        return ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "expert_iteration",
                "--train_file", str(train), "--prompts_file", str(prompts), "--num_iterations", "2",
                "--samples_per_prompt", "3", "--temperature", "1.0", "--max_new_tokens", "4",
                "--generation_batch_size", "8", "--reward_threshold", "0", *FAST_FLAGS, *extra]

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, ei_files) -> Path:
    train, prompts = ei_files
    out = tmp_path_factory.mktemp("ref") / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy",
                  "expert_iteration", "--train_file", str(train), "--prompts_file", str(prompts),
                  "--num_iterations", "2", "--samples_per_prompt", "3", "--temperature", "1.0",
                  "--max_new_tokens", "4", "--generation_batch_size", "8", "--reward_threshold", "0", *FAST_FLAGS)
    assert r.returncode == 0, r.output
    return out


RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def test_iteration_commits_its_generated_data_with_lineage_and_statistics(reference):
    m = manifest(reference / "data" / "iter_1")
    assert m["kind"] == "data" and m["iteration"] == 1
    assert m["extra"]["weights_id"]  # which model generated it
    stats = m["extra"]["stats"]
    assert stats["samples"] == 60 and stats["prompts"] == 20
    rows = [json.loads(x) for x in (reference / "data" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {r["sample"] for r in rows} == {0, 1, 2}
    metrics = [json.loads(x) for x in (reference / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["samples"] == 60 and "acceptance_rate" in metrics[1]


def test_kill_during_generate_regenerates_identical_data(tmp_path, ei_args, reference):
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(out), fault="generation.batch=kill#3")
    assert r.returncode == -9
    assert not (out / "data" / "iter_1" / "itertrain.manifest.json").exists()
    r = itertrain("train", *ei_args(out), *RESUME)
    assert r.returncode == 0, r.output
    assert "reusing committed data" not in r.stdout
    for name in ("samples.jsonl", "accepted.jsonl"):
        assert (out / "data/iter_1" / name).read_bytes() == (reference / "data/iter_1" / name).read_bytes()
    assert (out / "iter_1/model.safetensors").read_bytes() == (reference / "iter_1/model.safetensors").read_bytes()


def test_kill_during_train_reuses_the_committed_data(tmp_path, ei_args, reference):
    out = tmp_path / "exp"
    # 3 saves in iteration 0, then iteration 1 is killed while saving its second checkpoint.
    r = itertrain("train", *ei_args(out), fault="checkpoint.save=kill#5")
    assert r.returncode == -9
    data = out / "data" / "iter_1" / "accepted.jsonl"
    stamp = data.stat().st_mtime_ns
    r = itertrain("train", *ei_args(out), *RESUME)
    assert r.returncode == 0, r.output
    assert "♻️  reusing committed data/iter_1" in r.stdout
    assert "Continuing at: iteration 1, step 4" in r.stdout
    assert data.stat().st_mtime_ns == stamp
    assert data.read_bytes() == (reference / "data/iter_1/accepted.jsonl").read_bytes()
    assert (out / "iter_1/model.safetensors").read_bytes() == (reference / "iter_1/model.safetensors").read_bytes()


def test_two_ranks_generate_the_same_data_as_one(tmp_path, ei_args, reference):
    out = tmp_path / "exp"
    r = torchrun(*ei_args(out), "--num_iterations", "2")
    assert r.returncode == 0, r.output
    # Same seed, same iteration-0 model (its training differs with 2 ranks, so compare generation
    # from the same weights): regenerate iteration 1's data on 1 rank from this run's iter_0.
    one = tmp_path / "one"
    (one).mkdir()
    import shutil

    shutil.copytree(out / "iter_0", one / "iter_0")
    shutil.copyfile(out / "itertrain.json", one / "itertrain.json")
    r = itertrain("train", *ei_args(one), *RESUME)
    assert r.returncode == 0, r.output
    assert manifest(one / "data/iter_1")["extra"]["weights_id"] == manifest(out / "data/iter_1")["extra"]["weights_id"]
    assert (one / "data/iter_1/samples.jsonl").read_bytes() == (out / "data/iter_1/samples.jsonl").read_bytes()


@pytest.mark.parametrize("body,expected", [
    ("raise ValueError('cannot parse the answer')", "raised ValueError: cannot parse the answer on example "),
    ("return 'yes'", "returned 'yes' (str) on example "),
])
def test_reward_function_errors_name_the_function_and_the_example(tmp_path, ei_args, ei_files, body, expected):
    # Right on the launch check's prompt rows (the first four), wrong on the other prompts' sampled completions.
    first = [json.loads(line)["prompt"] for line in ei_files[1].read_text().splitlines()[:4]]
    (tmp_path / "my_rewards.py").write_text(
        f"def score(prompt, completion, answer):\n    if prompt in {first!r}:\n        return 1.0\n    {body}\n")
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(out, "--reward_fn", "my_rewards:score"), env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.output
    assert "reward function my_rewards:score" in r.stderr and expected in r.stderr
    assert "prompt '" in r.stderr and "Traceback" not in r.stderr
    assert (out / "iter_0" / "itertrain.manifest.json").exists()  # iteration 0 stays committed


@pytest.mark.parametrize("body,expected", [
    # A TRL reward function written for another dataset: it reads a column the prompt rows do not have.
    ("return [float(c == s) for c, s in zip(completions, kwargs['solution'])]",
     "failed the launch check (4 prompts x 3 samples): reward function my_rewards:score raised KeyError: 'solution'"),
    # One reward per prompt instead of one per completion (seen only on several prompts x samples).
    ("return [0.0 for _ in dict.fromkeys(prompts)]",
     "failed the launch check (4 prompts x 3 samples): reward function my_rewards:score returned 4 rewards for 12 "
     "completions"),
    # A verdict string instead of a number, for the completions that are not the reference answer.
    ("return [1.0 if c == a else 'wrong' for c, a in zip(completions, kwargs['answer'])]",
     "returned 'wrong' (str, not a number) for 8 of 12 completions at launch (4 prompts x 3 samples)"),
], ids=["raises", "wrong_length", "non_numeric"])
def test_launch_check_catches_a_bad_reward_function_before_iteration_0_trains(tmp_path, ei_args, body, expected):
    (tmp_path / "my_rewards.py").write_text(f"def score(prompts, completions, **kwargs):\n    {body}\n")
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(out, "--reward_fn", "my_rewards:score"), env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2, r.output
    assert f"--reward_funcs my_rewards:score {expected}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing trained, nothing written


def test_min_accepted_stops_before_training_and_a_relaunch_with_a_lower_value_trains_on_the_committed_data(
        tmp_path, ei_args, reference):
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(out, "--min_accepted", "1000"))
    assert r.returncode == 1, r.output
    kept = json.loads((out / "data/iter_1/stats.json").read_text())["accepted"]
    assert f"iteration 1: the verifier kept {kept} distinct samples, fewer than --min_accepted 1000" in r.stderr
    assert f"relaunch with --min_accepted {kept} (or lower)" in r.stderr and "Traceback" not in r.stderr
    assert manifest(out / "data/iter_1")["kind"] == "data"  # the sampled data stays committed
    assert not (out / "iter_1").exists() and not list(out.glob("checkpoint-*"))  # nothing of iteration 1 trained
    samples = (out / "data/iter_1/samples.jsonl").read_bytes()

    r = itertrain("train", *ei_args(out, "--min_accepted", str(kept)), *RESUME)
    assert r.returncode == 0, r.output
    assert "reusing committed data/iter_1" in r.stdout
    assert (out / "data/iter_1/samples.jsonl").read_bytes() == samples
    assert manifest(out / "iter_1")["extra"]["metrics"]["accepted"] == kept
