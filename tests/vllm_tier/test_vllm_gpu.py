"""On a GPU (skipped without CUDA): a bf16 model of about 0.57B parameters samples on vLLM, and the
engine's GPU memory is given back before training starts."""

from __future__ import annotations

import json
import re

import pytest

from conftest import itertrain
from itertrain.generation.vllm import version as vllm_version

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(vllm_version() is None, reason="vLLM is not installed"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_half_billion_parameter_bf16_model_samples_on_vllm_and_the_engine_memory_is_released_before_training(
        tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from itertrain.tiny_model import TinyModelSpec, init_model

    fp32, model = tmp_path / "fp32", tmp_path / "model"
    init_model(fp32, TinyModelSpec(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                                   num_attention_heads=12, max_position_embeddings=512))
    m = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) >= 0.5e9
    m.save_pretrained(model)  # the weights as bf16
    AutoTokenizer.from_pretrained(fp32).save_pretrained(model)
    del m
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(32)))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(32)))
    r = itertrain("train", "--model_name", str(model), "--output_dir", str(tmp_path / "exp"), "--strategy",
                  "expert_iteration", "--train_file", str(train), "--prompts_file", str(prompts), "--num_iterations",
                  "2", "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
                  "--model_dtype", "bfloat16", "--bf16", "true", "--reward_threshold", "0", "--report_to", "none",
                  "--disable_tqdm", "true", "--generation_backend", "vllm", "--vllm_gpu_memory_utilization", "0.3",
                  timeout=1200)
    assert r.returncode == 0, r.output[-4000:]
    before, held, after = map(float, re.search(r"GPU (\d+) -> (\d+) -> (\d+) MiB", r.stdout).groups())
    assert held - before > 1024, r.stdout  # the engine took its weights and KV cache on the GPU
    assert after - before < 0.1 * (held - before), r.stdout  # and gave (almost) all of it back before training
