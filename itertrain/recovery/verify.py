"""Verification of artifacts.

Two depths:
- `structural_problems`: metadata-level checks for directories that have no manifest (written by
  plain HF Trainer, `save_pretrained`, or the guide's `base_model/`), in every checkpoint layout HF
  writes (plain, FSDP sharded, DeepSpeed: see `sharded.py`). Reads headers, archive directories and
  pickle opcodes, never tensor data, and never runs pickled code.
- `deep_problems`: for committed artifacts, every byte against the manifest's xxh3 checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

from itertrain.artifacts.manifest import Manifest, verify_checksums
from itertrain.layout import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    DEEPSPEED_LATEST,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    WEIGHT_FILES,
    Kind,
    deepspeed_step_dir,
    fsdp_dirs,
    optimizer_file,
)
from itertrain.weights import torch_archive_problem, weight_shapes


def structural_problems(directory: Path, kind: str) -> list[str]:
    """Problems that make a manifest-less directory unusable. `kind`: trainer_checkpoint | iteration_model."""
    directory = Path(directory)
    if kind == Kind.TRAINER_CHECKPOINT.value:
        return _checkpoint_problems(directory)
    problems = _weights_problems(directory)
    for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME):
        if (directory / name).exists():
            try:
                json.loads((directory / name).read_text())
            except (ValueError, OSError) as e:
                problems.append(f"{name} does not parse: {e}")
    return problems


def _weights_problems(directory: Path) -> list[str]:
    try:
        weight_shapes(directory)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        return [f"weights: {e}"]
    return []


def _checkpoint_problems(directory: Path) -> list[str]:
    """A trainer checkpoint in any layout HF writes: plain (model.safetensors, optimizer.pt), FSDP
    sharded (pytorch_model_fsdp_0/, optimizer_0/) or DeepSpeed (global_stepN/)."""
    from itertrain.recovery import sharded

    fsdp_model, fsdp_optimizer = fsdp_dirs(directory)
    deepspeed = deepspeed_step_dir(directory) is not None or (directory / DEEPSPEED_LATEST).exists()
    problems: list[str] = []
    if fsdp_model is not None and not any((directory / n).exists() for n in WEIGHT_FILES):
        problems += sharded.dcp_problems(fsdp_model)
    elif not (deepspeed and not any((directory / n).exists() for n in WEIGHT_FILES)):  # ZeRO-3 keeps them inside
        problems += _weights_problems(directory)
    try:
        int(json.loads((directory / TRAINER_STATE_NAME).read_text())["global_step"])
    except FileNotFoundError:
        problems.append(f"{TRAINER_STATE_NAME} is missing")
    except (ValueError, KeyError, TypeError, OSError) as e:
        problems.append(f"{TRAINER_STATE_NAME} does not parse: {e}")
    archives = list(directory.glob("rng_state*.pth"))
    whole = optimizer_file(directory)
    if whole is not None or not (fsdp_optimizer or deepspeed):
        archives += [whole or directory / OPTIMIZER_NAME, directory / SCHEDULER_NAME]
    else:  # the optimizer is sharded; HF writes scheduler.pt beside it unless DeepSpeed owns the scheduler
        problems += sharded.dcp_problems(fsdp_optimizer) if fsdp_optimizer else sharded.deepspeed_problems(directory)
        archives += [directory / SCHEDULER_NAME] if fsdp_optimizer or (directory / SCHEDULER_NAME).exists() else []
    for path in sorted(archives):
        why = f"{path.name} is missing" if not path.exists() else torch_archive_problem(path)
        if why:
            problems.append(why)
    return problems


def deep_problems(directory: Path, manifest: Manifest | None, kind: str) -> list[str]:
    """Full verification: checksums for committed artifacts, structure for foreign ones."""
    if manifest is None:
        return structural_problems(directory, kind)
    return verify_checksums(directory, manifest)
