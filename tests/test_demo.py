"""`itertrain demo`, shortened: the main job's plumbing (model creation, expert iteration on the built-in
task, table, plot, resume on rerun). Whether accuracy rises is measured by the full demo, not here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import itertrain, manifest
from itertrain.tasks.arithmetic import ArithmeticTask
from itertrain.tasks.curriculum import describe

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

# The demo's own flags, cut down to seconds: 2 iterations of a few steps, one sample per prompt. A model
# trained for 6 steps solves no 4-digit addition, so every sample is kept (threshold 0) to have data.
SHORT = ["--num_iterations", "2", "--sft_max_steps", "4", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "3",
         "--samples_per_prompt", "1", "--reward_threshold", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("ref") / "demo"
    return root, itertrain("demo", "--output_dir", str(root), *SHORT, timeout=600)


def test_demo_creates_model_runs_expert_iteration_prints_table_and_plot(short_demo) -> None:
    root, r = short_demo
    assert r.returncode == 0, r.output
    exp = root / "experiment"
    assert (root / "tiny-model" / "config.json").exists()
    rows = [json.loads(line) for line in (exp / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1]
    assert [row["steps"] for row in rows] == [4, 6]  # --sft_max_steps for the SFT iteration 0, --max_steps after
    # one sample per prompt, as many prompts as the task's fixed schedule has
    assert rows[1]["samples"] == len(ArithmeticTask(seed=0).prompts(1))
    assert {"accuracy_3digit", "accuracy_4digit", "accuracy_5digit", "accuracy_6digit"} <= rows[1].keys()
    # sampled held-out figures on the demo's eval prompts (200 held-out problems, 4 samples each)
    assert len((root / "eval-prompts.jsonl").read_text().splitlines()) == 200
    assert {"heldout_mean_reward", "heldout_pass_at_1", "heldout_pass_at_4"} <= rows[1].keys()
    # the curriculum's decision (threshold 0: every probe sample passes, so every level counts as passed and
    # the hardest gets most prompts) is in the data manifest and the metrics, and printed
    decided = manifest(exp / "data" / "iter_1")["extra"]["stats"]["curriculum"]
    every = {"4s": 1.0, "4": 1.0, "5s": 1.0, "5": 1.0, "6s": 1.0, "6": 1.0}
    assert decided == rows[1]["curriculum"] == {"pass_rates": every, "frontier": "6", "prompt_mix": {
        "4s": 100, "4": 100, "5s": 100, "5": 100, "6s": 100, "6": 3500}}
    assert ("🎯 data/iter_1 curriculum: prompts per digits 4s:100 4:100 5s:100 5:100 6s:100 6:3500 "
            "(pass 4s:100% 4:100% 5s:100% 5:100% 6s:100% 6:100%)") in r.stdout
    # the table printed at the end has one line per iteration, with the prompts' digits and sample count
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| iter | prompts by digits | samples | accepted | kept | train loss | 3digit acc")
    assert "| heldout reward | heldout pass@1 | heldout pass@4 | wall s |" in table[0]
    assert table[1].startswith("| 0 | — | — |")
    assert table[2].startswith(f"| 1 | 4s:100 4:100 5s:100 5:100 6s:100 6:3500 | {rows[1]['samples']} |")
    png = exp / "runs" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (exp / "data" / "iter_1" / "itertrain.manifest.json").exists()

    # rerunning the same command finds the experiment complete and trains nothing
    before = manifest(exp / "iter_1")
    again = itertrain("demo", "--output_dir", str(root), *SHORT)
    assert again.returncode == 0, again.output
    assert "all 2 iterations are committed; nothing to do" in again.stdout
    assert "stage: train" not in again.stdout
    assert manifest(exp / "iter_1") == before


def test_kill_during_the_curriculum_probe_relaunch_decides_the_same_and_rebuilds_identical_bytes(
        tmp_path: Path, short_demo) -> None:
    ref = short_demo[0] / "experiment"
    # iteration 0's evaluation samples 5 batches (one per held-out set, one of eval-prompts.jsonl); the 6th is
    # iteration 1's probe
    r = itertrain("demo", "--output_dir", str(tmp_path / "demo"), *SHORT, fault="generation.batch=kill#6", timeout=600)
    assert r.returncode == -9, r.output
    assert "stage: generate" in r.stdout and "curriculum:" not in r.stdout  # killed before deciding
    r = itertrain("demo", "--output_dir", str(tmp_path / "demo"), *SHORT, timeout=600)
    assert r.returncode == 0, r.output
    exp = tmp_path / "demo" / "experiment"
    assert manifest(exp / "data/iter_1")["extra"]["stats"] == manifest(ref / "data/iter_1")["extra"]["stats"]
    for name in ("data/iter_1/samples.jsonl", "data/iter_1/accepted.jsonl", "iter_1/model.safetensors"):
        assert (exp / name).read_bytes() == (ref / name).read_bytes(), name


def test_demo_refuses_a_model_directory_that_holds_something_else(tmp_path: Path) -> None:
    model = tmp_path / "demo" / "tiny-model"
    model.mkdir(parents=True)
    (model / "notes.txt").write_text("mine")
    r = itertrain("demo", "--output_dir", str(tmp_path / "demo"), *SHORT)
    assert r.returncode == 2, r.output
    assert "holds no model" in r.stderr
    assert (model / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "demo" / "experiment").exists()


# The DPO demo, cut down the same way. A model trained for 6 steps gets no answer right, so exact match
# would give no pair: partial credit (a batched reward in TRL's form) ranks its wrong answers.
DPO_SHORT = ["--num_iterations", "2", "--sft_max_steps", "4", "--max_steps", "6", "--save_steps", "3",
             "--logging_steps", "3", "--samples_per_prompt", "2", "--reward_fn", "itertrain.tasks.arithmetic:digit_credit",
             "--disable_tqdm", "true"]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")
def test_dpo_demo_runs_sft_then_dpo_on_the_same_problems_and_prints_its_pairs_table(tmp_path: Path) -> None:
    r = itertrain("demo", "--strategy", "iterative_dpo", "--output_dir", str(tmp_path / "demo"), *DPO_SHORT, timeout=900)
    assert r.returncode == 0, r.output
    exp = tmp_path / "demo" / "experiment-dpo"
    rows = [json.loads(line) for line in (exp / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1]
    assert rows[1]["samples"] == 2 * len(ArithmeticTask(seed=0).prompts(1)) and rows[1]["pairs"] > 0
    pairs = (exp / "data" / "iter_1" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == rows[1]["pairs"] and manifest(exp / "data" / "iter_1")["extra"]["stats"]["pairs"] == len(pairs)
    assert manifest(exp / "iter_1")["lineage"]["ref_model"] == "iter_0"
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| iter | prompts by digits | samples | mean reward | pairs | train loss | 3digit acc")
    assert table[2].startswith(f"| 1 | {describe(rows[1]['curriculum'], rates=False)} | {rows[1]['samples']} | "
                               f"{rows[1]['mean_reward']:.3f} | {rows[1]['pairs']} |")
    assert (exp / "runs" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "demo" / "experiment").exists()  # expert iteration's demo directory is its own


GRPO_SHORT = ["--num_iterations", "2", "--sft_max_steps", "6", "--max_steps", "4", "--save_steps", "2",
              "--logging_steps", "2", "--disable_tqdm", "true"]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")
def test_grpo_demo_runs_sft_then_grpo_and_prints_reward_kl_and_accuracy(tmp_path: Path) -> None:
    r = itertrain("demo", "--strategy", "grpo", "--output_dir", str(tmp_path / "demo"), *GRPO_SHORT, timeout=900)
    assert r.returncode == 0, r.output
    exp = tmp_path / "demo" / "experiment-grpo"
    rows = [json.loads(line) for line in (exp / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1] and "reward" in rows[1] and "kl" in rows[1]
    assert manifest(exp / "iter_1")["lineage"]["ref_model"] == "iter_0"
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    # the GRPO iteration's prompts came from the curriculum: its decision is the table's second column
    assert table[0].startswith("| iter | prompts by digits | mean reward | kl | train loss | 3digit acc")
    mix = describe(rows[1]["curriculum"], rates=False)  # the rungs in ladder order (metrics.jsonl sorts keys as text)
    assert table[2].startswith(f"| 1 | {mix} | {rows[1]['reward']:.3f} | {rows[1]['kl']:.4f} |")


def test_a_demo_flag_overridden_under_either_name_keeps_the_users_value_and_is_not_named_twice() -> None:
    from itertrain.demo import without_overridden

    own = ["--model_name_or_path", "m", "--num_generations", "8", "--loss_type", "sigmoid", "sft", "--seed", "0"]
    assert without_overridden(own, ["--samples_per_prompt", "1", "--loss-type=ipo", "--max_steps", "5"]) == \
        ["--model_name_or_path", "m", "--seed", "0"]
    assert without_overridden(own, ["--model_name", "mine"]) == own[2:]
    assert without_overridden(own, []) == own


def test_sigterm_to_the_demo_commits_the_step_it_stopped_and_the_rerun_finishes_byte_identical(
        tmp_path: Path, short_demo) -> None:
    """The demo is a train run: SIGTERM inside training commits a checkpoint at the step and exits 143 with one
    line (it used to die at once, taking the steps since the last periodic checkpoint with it)."""
    import signal
    import time

    from conftest import PY, base_env
    from jobs import Job

    ref, _ = short_demo
    out = tmp_path / "demo"
    release = tmp_path / "release"
    cmd = [PY, "-m", "itertrain", "demo", "--output_dir", str(out), *SHORT, "--logging_steps", "1"]
    # iteration 0 holds its third step until released: the signal lands inside training, whatever the machine's speed
    with Job(cmd, base_env({"ITERTRAIN_FAULT": f"train.step=hold:{release}#3"})) as job:
        job.wait_for(r"\{'loss': ", 2)
        job.signal_agent(signal.SIGTERM)
        time.sleep(1)  # the watcher thread records it; the held step then ends and training stops at its boundary
        release.touch()
        code = job.wait(300)
        output = job.output
    assert code == 143, output
    assert output.count("itertrain: preempted: SIGTERM") == 1, output
    (checkpoint,) = [p for p in out.glob("experiment/checkpoint-*") if (p / "itertrain.manifest.json").exists()]
    assert manifest(checkpoint)["extra"]["preemption"]["signal"] == "SIGTERM"
    step = int(checkpoint.name.split("-")[1])
    assert step < 4 and not (out / "experiment" / "iter_0").exists()  # iteration 0 (4 steps) stopped inside

    r = itertrain("demo", "--output_dir", str(out), *SHORT, "--logging_steps", "1", timeout=600)
    assert r.returncode == 0, r.output
    assert f"Continuing at: iteration 0, step {step}" in r.stdout
    for name in ("iter_0/model.safetensors", "iter_1/model.safetensors"):
        assert (out / "experiment" / name).read_bytes() == (ref / "experiment" / name).read_bytes(), name
