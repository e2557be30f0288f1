"""The experiment record `itertrain.json`: what defines the experiment, compared on every resume."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from itertrain.args import RunConfig, dataclass_dict
from itertrain.errors import RecoveryRefused
from itertrain.fsutil import atomic_write_json
from itertrain.layout import EXPERIMENT_RECORD, MANIFEST_NAME, Kind, scan

SCHEMA_VERSION = 1
# A change to these is a different experiment (model, strategy, data): refused without
# --allow_config_change. Each strategy adds its own (`Strategy.defining_fields`).
DEFINING = ("model_name", "tokenizer_name", "strategy", "task", "iteration_init", "train_file", "dataset_name",
            "dataset_config", "dataset_split", "eval_file",
            "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "iteration_model")
# Changes to these are expected and not worth a warning.
_QUIET = {
    "resume_from", "resume_from_iteration", "overwrite_output_dir", "allow_config_change", "output_dir",
    "logging_dir", "local_rank", "run_name", "disable_tqdm", "log_level", "log_level_replica",
    "preemption", "preemption_grace_s", "dist_timeout_s", "dist_io_timeout_s",  # how this launch runs, not what
    "async_save",  # how checkpoints are written, not what they hold (the files are the same)
}
_MAX_LAUNCHES = 100
_PATHS = ("model_name", "tokenizer_name", "train_file", "dataset_name", "eval_file", "prompts_file", "reward_model")
_IDS = ("model_name", "dataset_name")  # a local path, or a Hub id (recorded as it is)


def load_record(root: Path) -> dict[str, Any]:
    """The experiment record, {} when the directory has none; the one reader of itertrain.json.
    A corrupt record is refused (exit 2): it decides what counts as torn and what as adopted."""
    path = Path(root) / EXPERIMENT_RECORD
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise RecoveryRefused(f"{path} cannot be read ({e}); it records what this experiment is") from e
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unexpected content (schema {record.get('schema') if isinstance(record, dict) else None!r})")
        if not isinstance(record.get("arguments", {}), dict) or not isinstance(record.get("adopted", []), list):
            raise ValueError("unexpected content (arguments or adopted)")
        return record
    except ValueError as e:
        raise RecoveryRefused(
            f"{path} is unreadable ({e}); it records what this experiment is. Restore it from a backup, or "
            "move it away to treat the directory's artifacts as written by another tool"
        ) from e


def resolved_arguments(cfg: RunConfig) -> dict[str, Any]:
    """The arguments worth recording (JSON-safe)."""
    args: dict[str, Any] = {}
    for group in cfg.groups()[:-1]:
        if group is cfg.lora and not cfg.lora.use_peft:
            continue  # LoRA settings mean nothing without --use_peft (and records from before LoRA have none)
        args.update(dataclass_dict(group))
    training = json.loads(cfg.training.to_json_string())
    args.update({k: v for k, v in training.items() if k not in args})
    if not args.get("dataset_name"):  # meaningless without it (and records from before it have none)
        args.pop("dataset_config", None)
        args.pop("dataset_split", None)
    for key in _PATHS:  # the same file spelled relative or absolute is the same experiment
        if args.get(key) and (key not in _IDS or os.path.exists(args[key])):
            args[key] = os.path.abspath(args[key])
    return args


def foreign_dirs(root: Path) -> list[str]:
    """Top-level artifact directories without a manifest that exist before itertrain first runs here."""
    if not root.is_dir():
        return []
    return sorted(e.rel for e in scan(root, inside_models=False)
                  if e.kind != Kind.DATA and not (root / e.rel / MANIFEST_NAME).exists())


def new_record(cfg: RunConfig, root: Path) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "experiment_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arguments": resolved_arguments(cfg),
        "adopted": foreign_dirs(root),
        "launches": [],
    }


def compare(old: dict[str, Any], new: dict[str, Any], defining_keys: tuple[str, ...] = DEFINING
            ) -> tuple[list[str], list[str]]:
    """(defining changes, harmless changes) between recorded and current arguments."""
    defining, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if key in _QUIET or old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (defining if key in defining_keys else harmless).append(line)
    return defining, harmless


def check_resume(record: dict[str, Any], cfg: RunConfig, defining_keys: tuple[str, ...] = DEFINING) -> list[str]:
    """Refuse a resume whose defining arguments changed; return warnings for the rest."""
    if not record:
        return []
    defining, harmless = compare(record.get("arguments", {}), resolved_arguments(cfg), defining_keys)
    if defining and not cfg.recovery.allow_config_change:
        raise RecoveryRefused(
            "the arguments that define this experiment changed since it was created ("
            + "; ".join(defining)
            + "). Resuming would continue a different experiment. Use the original values, a new --output_dir, "
            "or --allow_config_change if this is intended."
        )
    warnings = [f"argument changed: {line}" for line in harmless]
    warnings += [f"argument changed (allowed by --allow_config_change): {line}" for line in defining]
    return warnings


def record_launch(root: Path, record: dict[str, Any], cfg: RunConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the record with this launch appended (rank 0)."""
    record = dict(record) if record else new_record(cfg, root)
    record["arguments"] = resolved_arguments(cfg)
    launches = list(record.get("launches", []))
    launches.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary})
    record["launches"] = launches[-_MAX_LAUNCHES:]
    atomic_write_json(Path(root) / EXPERIMENT_RECORD, record)
    return record


def record_iteration(root: Path, iteration: int, hyperparameters: dict[str, Any]) -> None:
    """Record the hyperparameters iteration K actually trained with (rank 0, after it committed)."""
    record = load_record(root)
    if not record:
        return
    used = dict(record.get("iterations") or {})
    used[str(iteration)] = {"hyperparameters": hyperparameters}
    record["iterations"] = used
    atomic_write_json(Path(root) / EXPERIMENT_RECORD, record)
