"""--generation_backend refusals that need no vLLM (the vLLM tier itself is tests/vllm_tier), and --top_k."""

from __future__ import annotations


import pytest
import torch

from conftest import itertrain
from itertrain.errors import UsageError
from itertrain.generation import GumbelSampler
from itertrain.generation.vllm import version as vllm_version
from itertrain.parser import parse_train_args


def test_use_vllm_with_a_strategy_that_does_not_sample_is_refused(model_dir, tmp_path):
    """TRL's --use_vllm is --generation_backend vllm; sft samples nothing, so it is refused (exit 2)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["--model_name", str(model_dir), "--output_dir", str(tmp_path / "out"), "--train_file", str(data)]
    with pytest.raises(UsageError, match="^--use_vllm true: --strategy sft does not sample its data.*Drop --use_vllm$"):
        parse_train_args([*argv, "--use_vllm", "true"])
    with pytest.raises(UsageError, match="^--generation_backend vllm: --strategy sft.*Drop --generation_backend$"):
        parse_train_args([*argv, "--generation_backend", "vllm"])
    assert parse_train_args(argv).generation.backend == "hf"


def test_use_vllm_with_generation_backend_hf_exits_2_naming_both_flags(model_dir, tmp_path):
    """--use_vllm true --generation_backend hf used to run vLLM without a word; a matching pair is fine."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["--model_name", str(model_dir), "--output_dir", str(tmp_path / "out"), "--train_file", str(data)]
    with pytest.raises(UsageError, match="--use_vllm true and --generation_backend hf conflict") as e:
        parse_train_args([*argv, "--use_vllm", "true", "--generation_backend", "hf"])
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="conflict"):
        parse_train_args([*argv, "--generation_backend=hf", "--use_vllm"])
    with pytest.raises(UsageError, match="^--use_vllm true: --strategy sft"):  # agreeing flags: no conflict
        parse_train_args([*argv, "--use_vllm", "true", "--generation_backend", "vllm"])


@pytest.mark.slow
@pytest.mark.skipif(vllm_version() is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_installed_exits_2_naming_the_extra_before_anything_is_written(tiny_model, tmp_path):
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "expert_iteration",
                  "--task", "arithmetic", "--generation_backend", "vllm")
    assert r.returncode == 2, r.output
    assert "vLLM is not installed" in r.stderr and "itertrain[vllm]" in r.stderr and "setup_vllm.sh" in r.stderr
    assert not out.exists()


def test_top_k_keeps_every_sample_among_the_k_most_likely_tokens():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]] * 64)
    picked = GumbelSampler(list(range(64)), temperature=10.0, top_p=1.0, top_k=2)(None, scores).argmax(-1)
    assert set(picked.tolist()) == {1, 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="sleep mode is allowed on a GPU")
@pytest.mark.parametrize("flags,message", [
    (["--vllm_enable_sleep_mode", "true"], "sleep mode needs a GPU"),
    (["--vllm_tensor_parallel_size", "2"], "only 1 is supported"),
    (["--top_k", "-1"], "--top_k -1: must be 0"),
])
def test_vllm_flags_this_machine_cannot_honour_are_refused_before_anything_is_written(model_dir, tmp_path, flags, message):
    argv = ["--model_name", str(model_dir), "--output_dir", str(tmp_path / "out"), "--strategy", "expert_iteration",
            "--task", "arithmetic", "--generation_backend", "vllm", *flags]
    with pytest.raises(UsageError, match=message):
        parse_train_args(argv)
