"""An adapter-only iteration model on disk: its files written canonically, its tensor shapes checked
against LoRA settings, and a missing `adapter_config.json` recreated from the run's recorded settings.

PEFT writes `target_modules` from a set (its order follows PYTHONHASHSEED) and records the path the
base was loaded from; itertrain rewrites the config with sorted keys and modules and the absolute
base path, so an iteration model is byte-identical across processes and a rebuilt config equals the
one that was lost.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from itertrain.lora import peft_target_modules
from itertrain.layout import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME
from itertrain.weights import safetensors_header

ADAPTER_NAME = "default"  # PEFT's name of the trained adapter (TRL's DPOTrainer may add a frozen "ref")
PEFT_MODEL_CARD = "README.md"  # PEFT's model-card template: nothing of the run's, and not needed to load


def lora_config(settings: dict[str, Any]):
    """The LoraConfig TRL's `get_peft_config` builds from these flags (a fresh object: PEFT resolves
    target_modules in place when it applies a config)."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                      lora_dropout=settings["lora_dropout"], bias="none",
                      target_modules=peft_target_modules(settings["lora_target_modules"]))


def expected_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the trained adapter as `write_adapter_files` writes it (adapter name
    stripped). Without `save_embedding_layers=False` here PEFT would expect the base lm_head/embedding
    weights that the adapter file (written with it) never holds, and reject every such adapter."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {k: tuple(v.shape) for k, v in state.items()}


def adapter_shape_problem(adapter_dir: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why the adapter file's tensors (header only) do not match `expected`; None when they do."""
    got = {k: tuple(v["shape"]) for k, v in safetensors_header(Path(adapter_dir) / ADAPTER_SAFE_WEIGHTS_NAME).items()
           if k != "__metadata__"}
    for name, shape in sorted(got.items()):
        if name not in expected:
            return f"tensor {name} is not produced by these LoRA settings (other --lora_target_modules?)"
        if expected[name] != shape:
            hint = ""
            if ".lora_A." in name:
                hint = f" (lora_A is (r, in): the file has r={shape[0]})"
            elif ".lora_B." in name:
                hint = f" (lora_B is (out, r): the file has r={shape[-1]})"
            return f"tensor {name} has shape {list(shape)}, these settings need {list(expected[name])}{hint}"
    missing = sorted(set(expected) - set(got))
    if missing:
        return f"{len(missing)} adapter tensors of these settings are missing from the file (e.g. {missing[0]})"
    return None


def canonical_config(config: dict[str, Any], base_dir: Path) -> str:
    """adapter_config.json as itertrain writes it: the absolute base path, inference mode (as PEFT saves
    it), sorted target modules and keys."""
    config = dict(config)
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    config["inference_mode"] = True
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_adapter_files(peft_model, directory: Path, base_dir: Path) -> None:
    """The trained adapter only (`adapter_model.safetensors`, `adapter_config.json`) into `directory`."""
    peft_model.save_pretrained(str(directory), selected_adapters=[ADAPTER_NAME], save_embedding_layers=False)
    path = directory / ADAPTER_CONFIG_NAME
    path.write_text(canonical_config(json.loads(path.read_text()), base_dir))
    (directory / PEFT_MODEL_CARD).unlink(missing_ok=True)


def settings_config(settings: dict[str, Any], base_dir: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """(tensor shapes, adapter_config.json content) that `settings` give on the base model in `base_dir`:
    the base architecture is built on the meta device (no weights read, no memory used)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        peft_model = get_peft_model(model, lora_config(settings))
    with tempfile.TemporaryDirectory() as tmp:  # PEFT's own serialisation of the resolved config
        peft_model.peft_config[ADAPTER_NAME].save_pretrained(tmp)
        config = json.loads((Path(tmp) / ADAPTER_CONFIG_NAME).read_text())
    return expected_shapes(peft_model), config


def adapter_config_problem(directory: Path, settings: dict[str, Any], base_dir: Path) -> tuple[str | None, str]:
    """(why the recorded LoRA settings do not fit the adapter file in `directory`, or None; the
    adapter_config.json text they give). Reads headers only, writes nothing. (LoRA alpha and dropout
    leave no trace in the shapes: they come from the record, never from the current flags.)"""
    shapes, config = settings_config(settings, base_dir)
    problem = adapter_shape_problem(directory, shapes)
    why = (f"{ADAPTER_CONFIG_NAME} is missing and the recorded LoRA settings do not fit "
           f"{ADAPTER_SAFE_WEIGHTS_NAME}: {problem}") if problem else None
    return why, canonical_config(config, base_dir)


def rebuild_adapter_config(directory: Path, settings: dict[str, Any], base_dir: Path) -> None:
    """Recreate a missing adapter_config.json from recorded LoRA settings, after checking every tensor
    of the adapter file against them. Raises ValueError when they do not fit."""
    problem, text = adapter_config_problem(directory, settings, base_dir)
    if problem:
        raise ValueError(problem)
    (Path(directory) / ADAPTER_CONFIG_NAME).write_text(text)
