"""vLLM flag checks that need vLLM installed but no engine: the LoRA rank the engine is started with,
and the one-line engine error. Skipped where vLLM is not installed."""

from __future__ import annotations

import pytest

from itertrain.generation.vllm import version as vllm_version
from conftest import itertrain

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(vllm_version() is None, reason="vLLM is not installed")]


@pytest.mark.parametrize("lora_r", [1, 2, 8, 12, 17, 300, 512])
def test_engine_lora_rank_is_the_smallest_rank_vllm_accepts_that_holds_lora_r(lora_r):
    from vllm.config.lora import LoRAConfig

    from itertrain.generation.vllm import allowed_lora_ranks, engine_lora_rank

    rank = engine_lora_rank(lora_r)
    assert rank >= lora_r
    assert not [r for r in allowed_lora_ranks() if lora_r <= r < rank]
    assert LoRAConfig(max_lora_rank=rank).max_lora_rank == rank  # vLLM's own validation accepts it


def test_an_engine_config_error_line_names_the_reason_not_only_the_class():
    from vllm.config.lora import LoRAConfig

    from itertrain.generation.vllm import _first_line

    with pytest.raises(Exception) as e:
        LoRAConfig(max_lora_rank=12)
    line = _first_line(e.value)
    assert "\n" not in line
    assert "max_lora_rank" in line and "512" in line, line


@pytest.mark.slow
def test_a_lora_rank_above_vllms_largest_is_refused_with_exit_2_before_anything_is_written(tmp_path, tiny_model,
                                                                                           train_file):
    out = tmp_path / "exp"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy",
                  "expert_iteration", "--train_file", str(train_file), "--prompts_file", str(prompts),
                  "--generation_backend", "vllm", "--use_peft", "--iteration_model", "adapter", "--lora_r", "1024",
                  timeout=600)
    assert r.returncode == 2, r.output[-3000:]
    assert "--lora_r 1024: vLLM serves LoRA adapters of rank at most 512" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_model_dtype_auto_runs_the_vllm_engine_in_the_dtype_the_hf_backend_loads(tiny_model):
    """vLLM's own "auto" picks bfloat16 for a float32 checkpoint; the HF backend samples in float32."""
    from itertrain.generation import vllm as backend
    from itertrain.weights import load_model

    hf_dtype = load_model(tiny_model, "auto", False).dtype
    llm = backend._engine(backend.EngineModel(tiny_model, tiny_model), backend.EngineOptions(dtype="auto"))
    try:
        assert llm.llm_engine.model_config.dtype == hf_dtype
    finally:
        backend._shutdown(llm, had_group=False)
        del llm
        backend._release()
