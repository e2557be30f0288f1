"""grpo with --task: each RL iteration's prompts come from the task's adaptive curriculum, probed on the
iteration's starting model (real 2-rank torchrun runs of TRL's GRPOTrainer on the tiny model): the rows are the
decision's, recorded in metrics.jsonl and the lineage, and a SIGKILL inside the iteration then a relaunch decides
the same and gives a byte-identical iteration model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import manifest, torchrun

RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")


def task_args(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    """The arithmetic task, no --prompts_file: SFT iteration 0 (8 steps), then a GRPO iteration of 6 steps (a
    generation every 2, a checkpoint every 2, committed before the next step: --async_commit false)."""
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "grpo", "--task", "arithmetic",
            "--seed", "0", "--num_iterations", "2", "--sft_max_steps", "8", "--max_steps", "6", "--save_steps", "2",
            "--num_generations", "4", "--max_completion_length", "8", "--per_device_train_batch_size", "4",
            "--steps_per_generation", "2", "--beta", "0.1",
            "--reward_funcs", "itertrain.tasks.arithmetic:digit_credit", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", "--async_commit", "false", *extra]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "runs/metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory, tiny_model) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("grpo-cur") / "exp"
    r = torchrun(*task_args(tiny_model, out), timeout=600)
    assert r.returncode == 0, r.output
    return out, r.stdout


@pytest.mark.slow
@needs_trl
def test_grpo_iteration_trains_on_the_prompts_the_curriculum_picked_and_records_the_decision(curriculum_run):
    from itertrain.data_lineage import rows_fingerprint
    from itertrain.tasks.arithmetic import ArithmeticTask

    out, stdout = curriculum_run
    metrics = metrics_rows(out)
    assert "curriculum" not in metrics[0]  # iteration 0 is SFT on labeled rows
    decided = metrics[1]["curriculum"]
    assert set(decided["pass_rates"]) == set(ArithmeticTask().levels()) and sum(decided["prompt_mix"].values()) == 4000
    assert "🎯" in stdout and "curriculum: prompts per digits" in stdout
    lineage = manifest(out / "iter_1")["lineage"]
    assert lineage["curriculum"] == decided  # the iteration's lineage holds the same decision
    task = ArithmeticTask(seed=0)  # --seed 0
    picked = task.mix_rows(1, decided["prompt_mix"])  # keys sorted as text, as JSON gives them back
    # the rows trained on (the data fingerprint) are the decision's, not the fixed schedule's (3+K)-digit problems
    assert lineage["train_data"]["fingerprint"] == rows_fingerprint(picked)
    assert rows_fingerprint(task.prompts(1)) != rows_fingerprint(picked)


@pytest.mark.slow
@needs_trl
def test_grpo_curriculum_iteration_killed_mid_block_relaunches_to_the_same_prompts_and_identical_model(
        tmp_path, tiny_model, curriculum_run):
    reference, _ = curriculum_run
    out = tmp_path / "exp"
    # SIGKILL after step 3 of the GRPO iteration (8 SFT steps + 3): checkpoint-2 is committed, step 3's block is not
    r = torchrun(*task_args(tiny_model, out), fault="train.step=kill#11", timeout=600)
    assert r.returncode != 0
    assert manifest(out / "checkpoint-2")["iteration"] == 1 and not (out / "checkpoint-4").exists()
    r = torchrun(*task_args(tiny_model, out), *RESUME, timeout=600)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 2" in r.stdout
    assert "🎯" in r.stdout  # probed again, on iter_0 (the checkpoint's weights would decide otherwise in general)
    for name in ("iter_0/model.safetensors", "iter_1/model.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (manifest(d / "iter_1")["lineage"] for d in (out, reference))
    assert ours["train_data"] == theirs["train_data"] and ours["curriculum"] == theirs["curriculum"]
    assert metrics_rows(out)[1]["curriculum"] == metrics_rows(reference)[1]["curriculum"]


# ---- the decision within a launch (no model: the probe is replaced by a recorded outcome) ---------------------
def grpo_strategy(model_dir: Path, tmp_path: Path, *extra: str):
    from itertrain.parser import parse_train_args
    from itertrain.strategies import StrategyContext, load_strategy

    cfg = parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task",
                            "arithmetic", "--strategy", "grpo", "--seed", "0", *extra])
    return load_strategy("grpo")(StrategyContext(cfg, tmp_path / "o", None, commit_data=None, move_aside=None))


@needs_trl
def test_an_rl_iterations_curriculum_is_probed_once_per_launch_and_its_rows_wait_for_the_probe(model_dir, tmp_path):
    from itertrain import data_lineage
    from itertrain.strategies.base import ModelSource
    from itertrain.strategies.online_rl import CurriculumPending

    strategy = grpo_strategy(model_dir, tmp_path)
    task = strategy.task()
    probes = []

    def probe(iteration, source):  # the probe's outcome: two 4-digit numbers seen added right once
        probes.append((iteration, source.path))
        return task.curriculum(iteration, [0.3] * 64 + [1 / 8] + [0.0] * 319)

    strategy.iteration_prompts = probe
    with pytest.raises(CurriculumPending):  # at launch, before the starting model is loaded: no rows yet
        strategy.train_rows(1)
    assert data_lineage.current(strategy, 1) is None  # so the launch's data check leaves it to the probe
    source = ModelSource("iter_0", "f0", load=lambda: None)
    lineage = strategy.iteration_lineage(1, source)
    assert lineage["curriculum"]["prompt_mix"] == {"4s": 3111, "4": 889}
    rows = strategy.train_rows(1)
    assert rows == task.mix_rows(1, {"4s": 3111, "4": 889}) and rows != task.prompts(1)
    strategy.iteration_lineage(1, source)
    assert strategy.train_rows(1) is rows and probes == [(1, "iter_0")]  # decided once, read by every caller


@needs_trl
def test_a_continued_checkpoint_whose_rows_the_probe_no_longer_picks_is_refused_naming_both(model_dir, tmp_path):
    from itertrain.errors import RecoveryRefused
    from itertrain.strategies.base import ModelSource

    strategy = grpo_strategy(model_dir, tmp_path)
    task = strategy.task()
    strategy.iteration_prompts = lambda iteration, source: task.curriculum(iteration, [0.0] * 384)
    strategy._restored[1] = ({"source": "task arithmetic", "fingerprint": "0123"}, "checkpoint-2")
    with pytest.raises(RecoveryRefused, match=r"checkpoint-2 of iteration 1 cannot be continued.*4s:4000.*0123"):
        strategy.iteration_lineage(1, ModelSource("iter_0", "f0", load=lambda: None))


@needs_trl
def test_grpo_probe_pass_rates_are_exact_match_whatever_reward_threshold_says(model_dir, tmp_path):
    from itertrain.strategies.base import ModelSource

    # --reward_threshold is expert iteration's; a GRPO probe's answers are all wrong, so no rung is passed
    strategy = grpo_strategy(model_dir, tmp_path, "--reward_threshold", "0")
    strategy.sample = lambda iteration, source, rows, purpose=(): [["x"] * 4 for _ in rows]
    _, decided = strategy.iteration_prompts(1, ModelSource("iter_0", "f0", load=lambda: None))
    assert decided["curriculum"]["pass_rates"] == {d: 0.0 for d in ("4s", "4", "5s", "5", "6s", "6")}
    assert decided["curriculum"]["prompt_mix"] == {"4s": 4000}
