"""PEFT models for itertrain: a seeded fresh adapter or one loaded from a checkpoint / iteration model, on
the full model the recovery plan names; the iteration model (merged or adapter only) written from it.

Adapter directories are never loaded with `AutoModelForCausalLM.from_pretrained`: transformers would
follow `base_model_name_or_path` and return the base model with a frozen adapter (or the base alone).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from itertrain.layout import ADAPTER_SAFE_WEIGHTS_NAME
from itertrain.lora import MERGED
from itertrain.lora.files import ADAPTER_NAME, adapter_shape_problem, expected_shapes, lora_config, write_adapter_files
from itertrain.weights import holds_adapter_only, load_model

# PEFT asks every model a deprecated transformers question on each forward pass (one warning per rank).
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


class AdapterLoadError(Exception):
    """An adapter's weights do not fit the model and LoRA settings they are loaded into."""


def load_full(directory: Path, dtype: str, trust_remote_code: bool):
    """A full model from a directory, by absolute path: PEFT records the path it was loaded from as
    `base_model_name_or_path`, and reads that directory's config at every adapter save."""
    directory = Path(directory).resolve()
    if holds_adapter_only(directory):
        raise AdapterLoadError(f"{directory} holds a LoRA adapter, not the full model an adapter applies to")
    return load_model(directory, dtype, trust_remote_code)


def attach_adapter(model, settings: dict[str, Any], *, seed: int, adapter_dir: Path | None = None):
    """`model` with a LoRA adapter under `settings`: fresh (lora_A drawn from `seed`: PEFT initialises it
    from the global RNG, before HF Trainer seeds), or with the weights of `adapter_dir` (checked against
    the settings' tensor names and shapes first: PEFT would skip missing tensors silently)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(settings))
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir).resolve()
        if not (adapter_dir / ADAPTER_SAFE_WEIGHTS_NAME).is_file():
            raise AdapterLoadError(f"{adapter_dir.name} holds no {ADAPTER_SAFE_WEIGHTS_NAME}"
                                   + (" (it holds full model weights)" if (adapter_dir / "config.json").exists() else ""))
        problem = adapter_shape_problem(adapter_dir, expected_shapes(peft_model))
        if problem:
            raise AdapterLoadError(f"{ADAPTER_SAFE_WEIGHTS_NAME} does not fit the LoRA settings of this run: {problem}")
        # An existing adapter name: PEFT copies the weights only (its adapter_config.json is not needed).
        peft_model.load_adapter(str(adapter_dir), ADAPTER_NAME, is_trainable=True)
    return peft_model


def load_with_adapter(adapter_dir: Path, base_dir: Path, settings: dict[str, Any], dtype: str,
                      trust_remote_code: bool):
    """An adapter-only iteration model as a model to sample from: its base model plus its adapter, built
    exactly as a training start builds it (same numerics)."""
    return attach_adapter(load_full(base_dir, dtype, trust_remote_code), settings, seed=0, adapter_dir=adapter_dir)


def load_source(directory: Path, base_dir: Path, settings: dict[str, Any] | None, dtype: str,
                trust_remote_code: bool):
    """Any iteration model: a full one directly, an adapter-only one on its base model."""
    if holds_adapter_only(directory):
        if settings is None:
            raise AdapterLoadError(f"{directory} holds a LoRA adapter only: run with --use_peft "
                                   "--iteration_model adapter to use it")
        return load_with_adapter(directory, base_dir, settings, dtype, trust_remote_code)
    return load_model(directory, dtype, trust_remote_code)


def load_iteration_model(directory: Path, cfg: Any):
    """An iteration model of this run, whatever it holds (what a strategy samples from, or a DPO reference):
    a full model directly, an adapter-only one on the run's base model with the run's LoRA settings."""
    from itertrain.lora import settings_of

    return load_source(Path(directory), Path(cfg.model.model_name), settings_of(cfg.lora) if cfg.lora.use_peft else None,
                       cfg.model.model_dtype, cfg.model.trust_remote_code)


class IterationModelSaver:
    """What `write_iteration_model` saves for a LoRA run: the merged full model, or the adapter only
    (`save_pretrained` has the signature the writer calls). Rank 0, once the iteration is done: merging
    changes the model's weights in place."""

    def __init__(self, peft_model, mode: str, base_dir: Path):
        self.model = peft_model
        self.mode = mode
        self.base_dir = Path(base_dir).resolve()

    def save_pretrained(self, directory: Path, max_shard_size: str) -> None:
        if self.mode == MERGED:
            # Only the trained adapter is merged (a DPO reference adapter, if any, is dropped).
            merged = self.model.merge_and_unload(adapter_names=[ADAPTER_NAME])
            merged.save_pretrained(directory, max_shard_size=max_shard_size)
        else:
            write_adapter_files(self.model, Path(directory), self.base_dir)
