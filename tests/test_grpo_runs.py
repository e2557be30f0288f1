"""grpo / rloo, real 2-rank runs of TRL's GRPOTrainer / RLOOTrainer: killed inside a generation block
(byte-identical on resume), refused when the reference or TRL's settings changed, bad reward functions at
launch, all-equal rewards, and on LoRA adapters."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import arithmetic_files, itertrain, manifest, relaunched_with_base_reference, torchrun, tree_hash

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


# ---- real runs: torchrun, 2 ranks, TRL's GRPOTrainer ---------------------------------------------------------
@pytest.fixture(scope="module")
def rl_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("grpo")
    arithmetic_files(d, prompts=32, top=99)
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
    r = relaunched_with_base_reference(killed_in_block, out, *rl_args(tiny_model, rl_files, out), *RESUME, cwd=rl_files)
    assert "checkpoint-2 of iteration 1 was trained against the reference model iter_0 (fingerprint " \
           f"{fingerprint(out / 'iter_0')})" in r.stderr
    assert f"this launch's reference is base model {tiny_model}" in r.stderr and "GRPO would continue" in r.stderr


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
