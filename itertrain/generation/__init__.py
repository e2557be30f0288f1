"""Sampling for the strategies that make their own data, and the held-out evaluation, on one of two
backends behind one call (`generate`): Hugging Face `generate()` (`hf`, itertrain/generation/hf.py) or a
vLLM engine per rank (`vllm`, itertrain/generation/vllm.py). Both take the same settings, deal the same
global batches to ranks, seed every (iteration, example, sample) alike, and return completions[i][s].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from itertrain import distributed
from itertrain.generation.common import Request, deal, example_seed, global_batches
from itertrain.generation.hf import GumbelSampler, sample_completions

__all__ = ["GumbelSampler", "Request", "Sampling", "deal", "example_seed", "generate", "global_batches",
           "heldout_accuracy", "sample_completions", "sample_trained", "backend_record", "engine_model_for"]


@dataclass(frozen=True)
class Sampling:
    """The settings of one sampling call."""

    samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    batch_size: int = 64
    seed_parts: tuple = (0,)
    desc: str = "generate"
    progress: bool = True

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def backend_record(cfg) -> dict[str, str]:
    """What the data manifest records of the backend that made the data: its name and version (vLLM: and
    the dtype its engine ran in)."""
    if cfg.generation.backend == "vllm":
        from itertrain.generation.vllm import version
        from itertrain.weights import resolved_dtype

        return {"backend": "vllm", "version": version() or "unknown",
                "dtype": resolved_dtype(Path(cfg.model.model_name), cfg.model.model_dtype)}
    import transformers

    return {"backend": "hf", "version": f"transformers {transformers.__version__}"}


def engine_model_for(path: Path, cfg):
    """The vLLM EngineModel of a model directory the recovery plan names: a full model as it is, an
    adapter-only iteration model as the run's base model with that adapter (vLLM's LoRA path)."""
    from itertrain.generation.vllm import EngineModel
    from itertrain.weights import holds_adapter_only

    tokenizer = Path(cfg.model.tokenizer_name or cfg.model.model_name)
    if holds_adapter_only(path):
        return EngineModel(Path(cfg.model.model_name).resolve(), tokenizer, adapter=Path(path).resolve(),
                           lora_rank=cfg.lora.lora_r)
    return EngineModel(Path(path).resolve(), tokenizer)


def _engine_options(cfg):
    from itertrain.generation.vllm import EngineOptions

    gen = cfg.generation
    return EngineOptions(dtype=cfg.model.model_dtype, gpu_memory_utilization=gen.vllm_gpu_memory_utilization,
                         tensor_parallel_size=gen.vllm_tensor_parallel_size,
                         enable_sleep_mode=gen.vllm_enable_sleep_mode, trust_remote_code=cfg.model.trust_remote_code)


def generate(cfg, tokenizer, prompts: list[str], sampling: Sampling, *, hf_model: Callable[[], Any],
             engine_model: Callable[[], Any]) -> list[list[str]]:
    """completions[i][s] on every rank, from the backend the flags choose. `hf_model` loads the model for
    `generate()`; `engine_model` names what a vLLM engine loads (an EngineModel: see `engine_model_for`)."""
    if cfg.generation.backend != "vllm":
        return sample_completions(hf_model(), tokenizer, prompts, **sampling.kwargs())
    from itertrain.generation import vllm

    model = engine_model()
    completions, note = vllm.sample_completions(model, tokenizer, prompts, options=_engine_options(cfg),
                                                **sampling.kwargs())
    if distributed.is_main():
        print(f"   🧹 vLLM engine released ({sampling.desc}): {note}; it had loaded {model.describe()}", flush=True)
    return completions


def _written_for_engine(model, tokenizer, directory: Path, cfg):
    """The in-memory model written where an engine can load it, as an EngineModel: the full model, or a
    PEFT model's trained adapter on the base it was put on."""
    from itertrain.generation.vllm import EngineModel

    was_training = model.training
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, selected_adapters=["default"])
        found = EngineModel(Path(model.peft_config["default"].base_model_name_or_path),
                            Path(cfg.model.tokenizer_name or cfg.model.model_name), adapter=directory,
                            lora_rank=cfg.lora.lora_r)
    else:
        _write_full_model(model, directory)
        tokenizer.save_pretrained(directory)
        found = EngineModel(directory, directory)
    model.train(was_training)
    return found


def _write_full_model(model, directory: Path) -> None:
    """config.json and model.safetensors of `model`, on every rank (transformers' save_pretrained writes on
    rank 0 only, and ranks on other nodes do not share a temporary directory). A tensor tied to one before
    it (lm_head to the embeddings) is written once, under its first name, as transformers does."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def clear_eval_scratch(root: Path) -> None:
    """Remove the model copies a stopped vLLM evaluation left in `root` (a SIGTERM exits past its cleanup,
    a SIGKILL cannot be caught). Run at each launch by rank 0; a link there is unlinked, never followed."""
    from itertrain.fsutil import safe_rmtree
    from itertrain.layout import EVAL_SCRATCH_DIR

    path = Path(root) / EVAL_SCRATCH_DIR
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        safe_rmtree(path, Path(root))


def _eval_scratch(root: Path) -> Path:
    """This rank's empty scratch directory inside the output dir (none of it through a link)."""
    from itertrain.fsutil import safe_rmtree
    from itertrain.layout import EVAL_SCRATCH_DIR

    parent = Path(root) / EVAL_SCRATCH_DIR
    if parent.is_symlink():
        parent.unlink()
    parent.mkdir(exist_ok=True)
    path = parent / f"rank-{distributed.rank()}"
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        safe_rmtree(path, Path(root))
    path.mkdir()
    return path


def _drop_eval_scratch(path: Path, root: Path) -> None:
    from itertrain.fsutil import safe_rmtree

    safe_rmtree(path, Path(root))
    try:
        path.parent.rmdir()  # the last rank out removes the folder
    except OSError:
        pass


def heldout_accuracy(task, model, ctx) -> dict[str, float]:
    """Greedy exact-match accuracy on each of the task's held-out sets (every rank gets the result). On
    vLLM the just-trained model is first written to a scratch directory of this rank inside the output
    dir (removed after, and at the next launch if the run is stopped meanwhile)."""
    cfg = ctx.cfg
    tmp = _eval_scratch(ctx.root) if cfg.generation.backend == "vllm" else None
    try:
        engine = _written_for_engine(model, ctx.tokenizer, tmp, cfg) if tmp is not None else None
        sets = task.heldout_sets()
        # vLLM: one call over every set (one engine start; greedy samples do not depend on their batch-mates).
        # HF: one call per set, as before, so that its batches and padding stay as they were.
        parts = [list(sets)] if engine is not None else [[name] for name in sets]
        metrics: dict[str, float] = {}
        for names in parts:
            rows = [r for name in names for r in sets[name]]
            sampling = Sampling(max_new_tokens=cfg.generation.max_new_tokens,
                                batch_size=cfg.generation.generation_batch_size, desc=f"eval {' '.join(names)}",
                                progress=not cfg.training.disable_tqdm)
            outs = iter(generate(cfg, ctx.tokenizer, [r["prompt"] for r in rows], sampling, hf_model=lambda: model,
                                 engine_model=lambda: engine))
            for name in names:
                correct = sum(task.is_correct(next(outs)[0], r["answer"]) for r in sets[name])
                metrics[f"accuracy_{name}"] = correct / max(len(sets[name]), 1)
        return metrics
    finally:
        if tmp is not None:
            _drop_eval_scratch(tmp, ctx.root)


def sample_trained(model, ctx, prompts: list[str], sampling: Sampling) -> list[list[str]]:
    """completions[i][s] on every rank from an in-memory model (the one an iteration just trained). On vLLM
    it is first written to this rank's scratch directory inside the output dir (removed after, and at the
    next launch if the run is stopped meanwhile), as `heldout_accuracy` does."""
    cfg = ctx.cfg
    tmp = _eval_scratch(ctx.root) if cfg.generation.backend == "vllm" else None
    try:
        engine = _written_for_engine(model, ctx.tokenizer, tmp, cfg) if tmp is not None else None
        return generate(cfg, ctx.tokenizer, prompts, sampling, hf_model=lambda: model, engine_model=lambda: engine)
    finally:
        if tmp is not None:
            _drop_eval_scratch(tmp, ctx.root)


def check_backend(cfg, strategy_name: str, samples: bool) -> None:
    """--generation_backend and its flags, before anything is written: UsageError (exit 2) for vLLM not
    installed, a strategy that does not sample (`samples`: it is a SampledDataStrategy), or a model
    architecture vLLM cannot load."""
    from itertrain.errors import UsageError

    gen = cfg.generation
    if gen.top_k < 0:
        raise UsageError(f"--top_k {gen.top_k}: must be 0 (off) or a positive number of tokens")
    if gen.backend != "vllm":
        return
    flag = "--use_vllm" if gen.use_vllm else "--generation_backend"  # the flag the user gave
    if not samples:
        raise UsageError(f"{flag} {'true' if gen.use_vllm else 'vllm'}: --strategy {strategy_name} does not sample "
                         "its data; vLLM serves strategies that do (expert_iteration, iterative_dpo, and plug-ins "
                         f"built on itertrain.strategies.expert_iteration.SampledDataStrategy). Drop {flag}")
    if not 0 < gen.vllm_gpu_memory_utilization <= 1:
        raise UsageError(f"--vllm_gpu_memory_utilization {gen.vllm_gpu_memory_utilization}: must be in (0, 1]")
    if gen.vllm_tensor_parallel_size != 1:
        raise UsageError(f"--vllm_tensor_parallel_size {gen.vllm_tensor_parallel_size}: itertrain runs one engine "
                         "per rank (colocated); only 1 is supported")
    import torch

    if gen.vllm_enable_sleep_mode and not torch.cuda.is_available():
        raise UsageError("--vllm_enable_sleep_mode: vLLM's sleep mode needs a GPU; drop it on CPU (itertrain shuts "
                         "the engine down after every generate stage anyway)")
    from itertrain.generation import vllm

    vllm.require_vllm()
    vllm.check_architecture(cfg.model.model_name)
    if cfg.lora.mode == "adapter":  # the engine serves the adapter itself: its rank must fit vLLM's list
        vllm.engine_lora_rank(cfg.lora.lora_r)
