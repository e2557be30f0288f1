"""grpo / rloo: TRL's flag names and config defaults, the generation-block rule for checkpoints, bad input at
launch, and real 2-rank runs of TRL's GRPOTrainer / RLOOTrainer killed inside a generation block (byte-identical
on resume), refused when the reference changed, and on LoRA adapters."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import itertrain, manifest, torchrun, tree_hash

RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")
# Partial credit in TRL's batched form (the untrained tiny model is never exactly right): digits, and the
# answer's length. It reads the prompt rows' `answer` column, which must reach it.
REWARD = """def score(prompts, completions, answer, **kwargs):
    return [sum(ch.isdigit() for ch in c) - abs(len(c) - len(a)) for c, a in zip(completions, answer)]

def broken(prompts, completions, **kwargs):
    return [0.0]

def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def needs_grade(prompts, completions, grade, **kwargs):
    return [1.0] * len(completions)
"""


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


# ---- real runs: torchrun, 2 ranks, TRL's GRPOTrainer ---------------------------------------------------------
@pytest.fixture(scope="module")
def rl_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("grpo")
    rng = random.Random(1)
    (d / "labeled.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                                             for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(64))))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                             for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(32))))
    (d / "rl_reward.py").write_text(REWARD)
    return d


def rl_args(tiny_model: Path, files: Path, out: Path, *extra: str, strategy: str = "grpo") -> list[str]:
    """SFT iteration 0 (8 steps), then an RL iteration of 6 steps: a generation every 2 steps, a checkpoint every
    2 (--async_commit false: checkpoint-2 is committed before step 3, so a kill at step 3 resumes from it)."""
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", strategy,
            "--train_file", str(files / "labeled.jsonl"), "--prompts_file", str(files / "prompts.jsonl"),
            "--num_iterations", "2", "--sft_max_steps", "8", "--max_steps", "6", "--save_steps", "2",
            "--num_generations", "4", "--max_completion_length", "6", "--per_device_train_batch_size", "4",
            "--steps_per_generation", "2", "--beta", "0.1", "--reward_funcs", "rl_reward:score",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none",
            "--async_commit", "false", *extra]


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory, tiny_model, rl_files) -> Path:
    out = tmp_path_factory.mktemp("grpo-ref") / "exp"
    r = torchrun(*rl_args(tiny_model, rl_files, out), cwd=rl_files)
    assert r.returncode == 0, r.output
    return out


@pytest.fixture(scope="module")
def killed_in_block(tmp_path_factory, tiny_model, rl_files) -> Path:
    """SIGKILL of torchrun and both ranks after step 3 of the GRPO iteration 1 (8 SFT steps + 3): the middle
    of the generation block of steps 3-4, whose completions exist only in memory; checkpoint-2 is committed."""
    out = tmp_path_factory.mktemp("grpo-killed") / "exp"
    r = torchrun(*rl_args(tiny_model, rl_files, out), fault="train.step=kill#11", cwd=rl_files)
    assert r.returncode != 0
    assert manifest(out / "checkpoint-2")["iteration"] == 1 and not (out / "checkpoint-4").exists()
    return out


@pytest.mark.slow
@needs_trl
def test_grpo_iteration_records_its_reference_and_trls_metrics_per_iteration(grpo_reference):
    from itertrain.artifacts.manifest import fingerprint

    lineage = manifest(grpo_reference / "iter_1")["lineage"]
    assert (lineage["ref_model"], lineage["ref_model_id"]) == ("iter_0", fingerprint(grpo_reference / "iter_0"))
    assert manifest(grpo_reference / "iter_1")["world_size"] == 2
    assert not (grpo_reference / "README.md").exists()  # TRL's model card stays out of the experiment
    metrics = [json.loads(x) for x in (grpo_reference / "runs/metrics.jsonl").read_text().splitlines()]
    assert "reward" not in metrics[0]  # iteration 0 is SFT
    rl = metrics[1]
    for key in ("reward", "rewards/score/mean", "kl", "completions/mean_length", "clip_ratio/region_mean",
                "frac_reward_zero_std"):
        assert isinstance(rl.get(key), float), (key, rl)
    assert rl["kl"] > 0  # the policy moved away from its reference, iter_0


@pytest.mark.slow
@needs_trl
def test_grpo_killed_inside_a_generation_block_resumes_byte_identical(tmp_path, tiny_model, rl_files,
                                                                       grpo_reference, killed_in_block):
    out = tmp_path / "exp"
    shutil.copytree(killed_in_block, out)
    r = torchrun(*rl_args(tiny_model, rl_files, out), *RESUME, cwd=rl_files)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 2" in r.stdout
    for name in ("iter_0/model.safetensors", "iter_1/model.safetensors"):
        assert (out / name).read_bytes() == (grpo_reference / name).read_bytes(), name
    ours, theirs = (manifest(d / "iter_1")["extra"]["metrics"] for d in (out, grpo_reference))
    assert {k: v for k, v in ours.items() if k != "wall_time_s"} == \
        {k: v for k, v in theirs.items() if k != "wall_time_s"}


@pytest.mark.slow
@needs_trl
def test_resuming_grpo_against_a_different_reference_model_is_refused_naming_both(tmp_path, tiny_model, rl_files,
                                                                                 killed_in_block):
    from itertrain.artifacts.manifest import fingerprint

    out = tmp_path / "exp"
    shutil.copytree(killed_in_block, out)
    before = tree_hash(out)
    r = itertrain("train", *rl_args(tiny_model, rl_files, out), *RESUME, "--ref_model", "base",
                  "--allow_config_change", cwd=rl_files)
    assert r.returncode == 2, r.output
    assert "checkpoint-2 of iteration 1 was trained against the reference model iter_0 (fingerprint " \
           f"{fingerprint(out / 'iter_0')})" in r.stderr
    assert f"this launch's reference is base model {tiny_model}" in r.stderr and "GRPO would continue" in r.stderr
    assert tree_hash(out) == before  # refused before anything was written


@pytest.mark.slow
@needs_trl
def test_resuming_grpo_mid_iteration_with_a_changed_beta_exits_2_naming_it_and_writes_nothing(tmp_path, tiny_model,
                                                                                            rl_files, killed_in_block):
    out = tmp_path / "exp"
    shutil.copytree(killed_in_block, out)
    before = tree_hash(out)
    args = [a if a != "0.1" else "0.5" for a in rl_args(tiny_model, rl_files, out)]  # --beta 0.1 -> 0.5
    r = itertrain("train", *args, *RESUME, cwd=rl_files)
    assert r.returncode == 2, r.output
    assert "checkpoint-2 of iteration 1 was trained with other GRPO settings than this launch's (--beta 0.1 -> 0.5)" \
        in r.stderr and "Traceback" not in r.stderr
    assert tree_hash(out) == before


@pytest.mark.slow
@needs_trl
def test_rloo_killed_inside_a_generation_block_resumes_byte_identical(tmp_path, tiny_model, rl_files):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = torchrun(*rl_args(tiny_model, rl_files, ref, strategy="rloo"), cwd=rl_files)
    assert r.returncode == 0, r.output
    r = torchrun(*rl_args(tiny_model, rl_files, out, strategy="rloo"), fault="train.step=kill#11", cwd=rl_files)
    assert r.returncode != 0 and manifest(out / "checkpoint-2")["iteration"] == 1
    r = torchrun(*rl_args(tiny_model, rl_files, out, strategy="rloo"), *RESUME, cwd=rl_files)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 2" in r.stdout
    assert (out / "iter_1/model.safetensors").read_bytes() == (ref / "iter_1/model.safetensors").read_bytes()
    assert "reward" in manifest(out / "iter_1")["extra"]["metrics"]


@pytest.mark.slow
@needs_trl
@pytest.mark.parametrize("case", ["fails", "wrong length"])
def test_reward_function_failing_or_of_the_wrong_length_exits_2_at_launch_naming_it(case, tmp_path, tiny_model,
                                                                                   rl_files):
    spec = "rl_reward:needs_grade" if case == "fails" else "rl_reward:broken"
    args = [a if a != "rl_reward:score" else spec for a in rl_args(tiny_model, rl_files, tmp_path / "o")]
    r = itertrain("train", *args, cwd=rl_files)
    assert r.returncode == 2, r.output
    assert f"--reward_funcs {spec} failed the launch check" in r.stderr, r.stderr
    assert ("TypeError" in r.stderr and "grade" in r.stderr) if case == "fails" else \
        "returned 1 rewards for" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "iter_0").exists()


@pytest.mark.slow
@needs_trl
def test_all_equal_rewards_warn_naming_the_iteration_and_metrics_show_it(tmp_path, tiny_model, rl_files):
    out = tmp_path / "exp"
    args = [a if a != "rl_reward:score" else "rl_reward:constant" for a in rl_args(tiny_model, rl_files, out)]
    r = itertrain("train", *args, "--sft_max_steps", "0", "--num_iterations", "1", "--max_steps", "2",
                  cwd=rl_files)
    assert r.returncode == 0, r.output
    assert "⚠️  iteration 0: every prompt's 4 completions got the same reward, so every advantage was zero" in r.stdout
    metrics = json.loads((out / "runs/metrics.jsonl").read_text().splitlines()[0])
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["reward_std"] == 0.0


@pytest.mark.slow
@needs_trl
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs itertrain[lora] (PEFT)")
def test_grpo_on_lora_adapters_killed_mid_iteration_resumes_byte_identical_against_the_adapter_off(
        tmp_path, tiny_model, rl_files):
    """--use_peft (merged iteration models): iteration 1 trains a fresh adapter on iter_0 against TRL's
    reference, the adapter switched off = iter_0, also after a kill and relaunch (TRL copies the adapter
    as it is at construction: after a resume, the checkpoint's trained one, unless itertrain switches it off)."""
    from itertrain.artifacts.manifest import fingerprint

    lora = ("--use_peft", "--lora_r", "4")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = torchrun(*rl_args(tiny_model, rl_files, ref, *lora), cwd=rl_files)
    assert r.returncode == 0, r.output
    lineage = manifest(ref / "iter_1")["lineage"]
    assert (lineage["ref_model"], lineage["ref_model_id"]) == ("iter_0", fingerprint(ref / "iter_0"))
    assert (ref / "iter_1/model.safetensors").read_bytes() != (ref / "iter_0/model.safetensors").read_bytes()
    r = torchrun(*rl_args(tiny_model, rl_files, out, *lora), fault="train.step=kill#11", cwd=rl_files)
    assert r.returncode != 0 and manifest(out / "checkpoint-2")["iteration"] == 1
    r = torchrun(*rl_args(tiny_model, rl_files, out, *lora), *RESUME, cwd=rl_files)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 2" in r.stdout
    assert (out / "iter_1/model.safetensors").read_bytes() == (ref / "iter_1/model.safetensors").read_bytes()
    assert manifest(out / "iter_1")["extra"]["metrics"]["kl"] == manifest(ref / "iter_1")["extra"]["metrics"]["kl"]
    r = itertrain("train", *rl_args(tiny_model, rl_files, tmp_path / "a", "--use_peft", "--iteration_model",
                                    "adapter"), cwd=rl_files)
    assert r.returncode == 2 and "--iteration_model merged" in r.stderr, r.output
