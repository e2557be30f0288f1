"""grpo / rloo: TRL's flag names and config defaults, the generation-block rule for checkpoints, bad input at
launch, the reward functions as TRL calls them, and TRL's metrics per iteration. Real 2-rank runs are in
test_grpo_runs.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")


def parse(model_dir: Path, tmp_path: Path, *extra: str):
    from itertrain.parser import parse_train_args

    return parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                             "--strategy", "grpo", *extra])


# ---- pure parts ---------------------------------------------------------------------------------------------
@needs_trl
def test_grpo_takes_trl_flag_names_and_keeps_grpoconfigs_defaults_over_hfs(model_dir, tmp_path):
    from trl import GRPOConfig

    cfg = parse(model_dir, tmp_path, "--num_generations", "4", "--max_completion_length", "7", "--beta", "0.2",
                "--loss_type", "grpo", "--steps_per_generation", "2", "--reward_funcs", "a:f", "b:g", "--reward_weights", "1.0", "0.5",
                "--per_device_train_batch_size", "4")
    t = cfg.training
    assert isinstance(t, GRPOConfig)
    # TRL's names reach TRL's fields; the itertrain flags of the same meaning are the same flags
    assert (t.num_generations, t.max_completion_length, t.beta, t.loss_type) == (4, 7, 0.2, "grpo")
    assert (cfg.generation.samples_per_prompt, cfg.generation.max_new_tokens) == (4, 7)
    assert (t.steps_per_generation, t.reward_weights) == (2, [1.0, 0.5])
    # GRPOConfig's defaults, not HF's: extra columns reach the reward function; TRL's learning rate and logging
    assert (t.remove_unused_columns, t.learning_rate, t.logging_steps) == (False, 1e-6, 10)
    assert (t.bf16, t.gradient_checkpointing) == (False, False)  # off unless asked for, as everywhere in itertrain
    explicit = parse(model_dir, tmp_path, "--remove_unused_columns", "true", "--learning_rate", "5e-5",
                     "--per_device_train_batch_size", "4", "--num_generations", "4").training
    assert (explicit.remove_unused_columns, explicit.learning_rate) == (True, 5e-5)  # what the user types wins


@needs_trl
def test_save_steps_off_a_generation_block_boundary_and_reward_weights_of_another_count_are_refused(model_dir, tmp_path):
    from itertrain.errors import UsageError

    with pytest.raises(UsageError, match=r"^--save_strategy steps --save_steps 3: grpo generates once per generation "
                                         r"block of 2 optimizer step\(s\).*a multiple of 2"):
        parse(model_dir, tmp_path, "--num_generations", "4", "--per_device_train_batch_size", "4",
              "--steps_per_generation", "2", "--save_steps", "3")
    with pytest.raises(UsageError, match=r"^--save_strategy epoch: grpo generates once per generation block"):
        parse(model_dir, tmp_path, "--num_generations", "4", "--per_device_train_batch_size", "4",
              "--steps_per_generation", "2", "--save_strategy", "epoch")
    ok = parse(model_dir, tmp_path, "--num_generations", "4", "--per_device_train_batch_size", "4",
               "--steps_per_generation", "2", "--save_steps", "4")
    assert ok.training.save_steps == 4
    with pytest.raises(UsageError, match=r"--reward_weights has 1 value\(s\) for 2 reward function\(s\) \(a:f, b:g\)"):
        parse(model_dir, tmp_path, "--num_generations", "4", "--per_device_train_batch_size", "4",
              "--reward_funcs", "a:f", "b:g", "--reward_weights", "1.0")


def test_generation_block_counts_optimizer_steps_per_generation():
    from itertrain.strategies.online_rl import generation_block

    def args(spg, ga, mu=1):
        return SimpleNamespace(steps_per_generation=spg, gradient_accumulation_steps=ga, num_iterations=mu)

    assert generation_block(args(None, 4)) == 1  # TRL's default: one generation per optimizer step
    assert generation_block(args(4, 1)) == 4
    assert generation_block(args(4, 2)) == 2
    assert generation_block(args(3, 2)) == 3  # 6 micro-batches: the first boundary both share
    assert generation_block(args(2, 1, mu=2)) == 4


def test_num_generations_not_dividing_the_generation_batch_exits_2_with_trls_rule(model_dir, tmp_path, capsys):
    pytest.importorskip("trl")
    from itertrain.cli import main

    code = main(["train", "--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                 "--strategy", "grpo", "--num_generations", "3", "--per_device_train_batch_size", "4"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("--num_generations 3 does not divide the generation batch of 4 completions (--per_device_train_batch_size "
            "4 × 1 process(es) × --steps_per_generation 1)") in err
    assert "whole groups of --num_generations completions per prompt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["rloo with one generation", "grpo with a reward model"])
def test_flags_rl_cannot_use_exit_2_with_one_itertrain_line_naming_the_flag(case, model_dir, tmp_path, capsys):
    pytest.importorskip("trl")
    from itertrain.cli import main

    extra = (["--strategy", "rloo", "--num_generations", "1"] if case.startswith("rloo") else
             ["--strategy", "grpo", "--reward_funcs", "a:f", "--reward_model", str(model_dir)])
    code = main(["train", "--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                 "--per_device_train_batch_size", "4", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    if case.startswith("rloo"):
        assert "--num_generations 1: RLOO compares each completion's reward with the others of its prompt's group, " \
               "so it needs at least 2 completions per prompt" in err and "Config" not in err
    else:  # the strategy's refusal, not "--reward_funcs and --reward_model both score samples"
        assert "--reward_model is not supported by it" in err and "both" not in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_demo_help_names_grpo_and_its_experiment_folder(capsys):
    from itertrain.demo import demo

    with pytest.raises(SystemExit):
        demo(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--strategy iterative_dpo or grpo, iterative DPO or GRPO" in out and "OUTPUT_DIR/experiment-grpo for grpo" in out


def test_a_preemption_signal_inside_a_generation_block_stops_at_its_boundary(monkeypatch):
    import signal

    from transformers import TrainerControl

    from itertrain import preemption

    monkeypatch.setattr(preemption, "_state", preemption._State())
    monkeypatch.setattr(preemption, "_arm_deadline", lambda: None)  # no grace timer in a unit test
    preemption._state.signum = signal.SIGTERM  # arrived during step 3 of blocks of 2 steps
    callback = preemption.PreemptionCallback(every=2)
    control = callback.on_step_end(None, SimpleNamespace(global_step=3, max_steps=10), TrainerControl())
    assert not control.should_save and not control.should_training_stop and preemption._state.agreed is None
    control = callback.on_step_end(None, SimpleNamespace(global_step=4, max_steps=10), TrainerControl())
    assert control.should_save and control.should_training_stop and preemption._state.agreed == (signal.SIGTERM, 4)


def test_a_checkpoint_inside_a_generation_block_of_this_launch_is_refused_unless_it_is_the_last_step(tmp_path):
    pytest.importorskip("trl")
    from itertrain.errors import RecoveryRefused
    from itertrain.strategies.base import ModelSource, StrategyContext
    from itertrain.strategies.grpo import GRPOStrategy
    from itertrain.strategies.online_rl import OnlineRLArguments

    training = SimpleNamespace(steps_per_generation=4, gradient_accumulation_steps=1, num_iterations=1, max_steps=10)
    cfg = SimpleNamespace(training=training, strategy_args=OnlineRLArguments(),
                          loop=SimpleNamespace(iteration_init="previous"), model=SimpleNamespace(model_name="m"))
    strategy = GRPOStrategy(StrategyContext(cfg, tmp_path, None, commit_data=None, move_aside=None))
    source = ModelSource("iter_0", None, load=lambda: None)
    # saved every 2 steps under --steps_per_generation 2; relaunched with 4
    with pytest.raises(RecoveryRefused, match=r"checkpoint-6 of iteration 1 is at step 6, inside a generation block "
                                              r"of 4 step\(s\) under this launch's --steps_per_generation 4"):
        strategy.check_restored(1, source, {}, str(tmp_path / "checkpoint-6"))
    strategy.check_restored(1, source, {}, str(tmp_path / "checkpoint-8"))  # a boundary
    strategy.check_restored(1, source, {}, str(tmp_path / "checkpoint-10"))  # the last step: nothing to regenerate


def test_a_checkpoint_inside_a_generation_block_of_an_epoch_based_run_is_refused_unless_it_is_the_last_step(tmp_path):
    """--max_steps -1: the iteration's total is the one HF computed and the checkpoint's trainer state records."""
    pytest.importorskip("trl")
    from itertrain.errors import RecoveryRefused
    from itertrain.strategies.base import ModelSource, StrategyContext
    from itertrain.strategies.grpo import GRPOStrategy
    from itertrain.strategies.online_rl import OnlineRLArguments

    training = SimpleNamespace(steps_per_generation=4, gradient_accumulation_steps=1, num_iterations=1, max_steps=-1)
    cfg = SimpleNamespace(training=training, strategy_args=OnlineRLArguments(),
                          loop=SimpleNamespace(iteration_init="previous"), model=SimpleNamespace(model_name="m"))
    strategy = GRPOStrategy(StrategyContext(cfg, tmp_path, None, commit_data=None, move_aside=None))
    source = ModelSource("iter_0", None, load=lambda: None)
    for step in (6, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}/trainer_state.json").write_text(json.dumps({"global_step": step,
                                                                                     "max_steps": 10}))
    with pytest.raises(RecoveryRefused, match=r"checkpoint-6 of iteration 1 is at step 6, inside a generation block"):
        strategy.check_restored(1, source, {}, "checkpoint-6")
    strategy.check_restored(1, source, {}, "checkpoint-10")  # the iteration's last step


@needs_trl
def test_resuming_inside_an_rl_iteration_with_changed_grpo_settings_is_refused_naming_each(model_dir, tmp_path):
    """A mix of two --beta / --num_generations in one iteration model is refused; the recorded values win."""
    from itertrain.errors import RecoveryRefused
    from itertrain.strategies.base import ModelSource, StrategyContext
    from itertrain.strategies.grpo import GRPOStrategy
    from itertrain.strategies.online_rl import rl_settings

    flags = ("--per_device_train_batch_size", "4", "--steps_per_generation", "2", "--max_steps", "6")
    was = parse(model_dir, tmp_path, "--num_generations", "4", "--beta", "0.1", *flags)
    now = parse(model_dir, tmp_path, "--num_generations", "2", "--beta", "0.5", *flags)
    source = ModelSource("iter_0", None, load=lambda: None)
    lineage = json.loads(json.dumps({"rl_settings": rl_settings(was.training)}))  # as the manifest holds it
    strategy = GRPOStrategy(StrategyContext(now, tmp_path, None, commit_data=None, move_aside=None))
    with pytest.raises(RecoveryRefused) as e:
        strategy.check_restored(1, source, lineage, "checkpoint-2")
    assert ("checkpoint-2 of iteration 1 was trained with other GRPO settings than this launch's (--beta 0.1 -> 0.5; "
            "--num_generations 4 -> 2)") in str(e.value)
    assert "restart iteration 1 from iter_0 with the new ones (--resume_from none --resume_from_iteration auto)" \
        in str(e.value)
    GRPOStrategy(StrategyContext(was, tmp_path, None, commit_data=None, move_aside=None)).check_restored(
        1, source, lineage, "checkpoint-2")  # the same settings: continues


def test_iteration_metrics_are_means_of_trls_logged_values_without_nan_or_others():
    from itertrain.strategies.online_rl import kept_metrics

    history = [{"loss": 1.0, "reward": 1.0, "rewards/score/mean": 1.0, "kl": 0.0, "step_time": 3.0,
                "rewards/score/std": 0.5, "clip_ratio/high_max": 1.0, "completions/max_length": 8,
                "completions/mean_length": 4.0, "clip_ratio/region_mean": 0.5, "frac_reward_zero_std": 0.0},
               {"loss": 2.0, "reward": 2.0, "rewards/score/mean": float("nan"), "kl": 0.5, "entropy": None},
               {"train_runtime": 9.0, "train_loss": 1.5}]
    assert kept_metrics(history) == {"reward": 1.5, "rewards/score/mean": 1.0, "kl": 0.25,
                                     "completions/mean_length": 4.0, "clip_ratio/region_mean": 0.5,
                                     "frac_reward_zero_std": 0.0}


def test_reward_functions_see_the_prompt_without_bos_and_the_rows_columns():
    from itertrain.rewards import RewardFunction, exact_match
    from itertrain.strategies.online_rl import TRLReward

    seen = []

    def batched(prompts, completions, answer, **kwargs):
        seen.append((prompts, answer))
        return [1] * len(completions)

    per_sample = TRLReward(RewardFunction(exact_match, "exact_match", batched=False), "<s>")
    assert per_sample(prompts=["<s>1+1=", "<s>1+1="], completions=["2", "3"], answer=["2", "2"]) == [1.0, 0.0]
    assert per_sample.__name__ == "exact_match"  # TRL's metric name: rewards/exact_match/mean
    TRLReward(RewardFunction(batched, "mod:batched", batched=True), "<s>")(prompts=["<s>2+2="], completions=["4"],
                                                                         answer=["4"], trainer_state=None)
    assert seen == [(["2+2="], ["4"])]
