"""Restore: apply a RecoveryPlan to a fresh process (the thin shell around the plan).

- weights: from the base model, an iteration model or a trainer checkpoint, loaded once;
- training state: full restore goes through HF Trainer's own resume (with its weight load skipped,
  since we loaded the weights); optimizer moments across an iteration boundary go through
  `OptimizerMomentsCallback`;
- `probe_state` checks, on every rank, that the state files it will read load safely
  (`weights_only=True`) and fit the model, before anything is applied.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from itertrain.artifacts.manifest import read_manifest, recommit
from itertrain.layout import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    OPTIMIZER_FSDP_FULL,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    WEIGHT_FILES,
    deepspeed_step_dir,
    fsdp_dirs,
    optimizer_file,
    rng_state_name,
)
from itertrain.recovery.discover import IterationModel
from itertrain.recovery.flags import BASE
from itertrain.recovery.plan import RecoveryPlan, StateScope
from itertrain.weights import load_model, weight_shapes

def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True (numpy RNG state allowlisted, as HF does); never runs pickled code."""
    try:
        from transformers.trainer_pt_utils import safe_globals
    except ImportError:  # older transformers (4.x, early 5.x) define it in transformers.trainer
        from transformers.trainer import safe_globals

    with safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def describe_load_error(path: Path, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, __import__("pickle").UnpicklingError) or "weights_only" in str(e):
        return f"{path.name} was refused: it holds a pickle that is not plain tensors and would run code ({text[:160]})"
    return f"{path.name} cannot be loaded: {text[:200]}"


def weights_dir(plan: RecoveryPlan, root: Path, base_model: str) -> Path:
    return Path(base_model) if plan.weights_from == BASE else root / plan.weights_from


def load_weights(directory: Path, base_model: str, dtype: str, trust_remote_code: bool, *, deepspeed: bool = False,
                 missing: tuple[str, ...] = ()):
    """The model with the weights of `directory`: an HF model dir or a checkpoint in any layout. A
    checkpoint with sharded weights only (FSDP SHARDED_STATE_DICT, DeepSpeed ZeRO-3) has no config:
    the architecture comes from the base model (every iteration shares it). `missing`: config files
    of `directory` that are gone and will be recreated from the base model; they are read from there
    now, so that nothing is written before the plan is final."""
    directory = Path(directory)
    if any((directory / name).exists() for name in WEIGHT_FILES):
        return with_base_configs(directory, base_model, dtype, trust_remote_code, missing)
    fsdp_model, _ = fsdp_dirs(directory)
    if fsdp_model is not None:
        from itertrain.recovery.sharded import load_dcp_weights

        model = load_model(Path(base_model), dtype, trust_remote_code)
        load_dcp_weights(fsdp_model, model)
        return model
    if deepspeed_step_dir(directory) is not None:
        if not deepspeed:
            raise ValueError(f"the weights of {directory.name} are inside DeepSpeed's {deepspeed_step_dir(directory).name}/"
                             " (ZeRO-3) and only DeepSpeed restores them: resume with --deepspeed")
        return load_model(Path(base_model), dtype, trust_remote_code)  # DeepSpeed's resume overwrites them
    return load_model(directory, dtype, trust_remote_code)  # fails with from_pretrained's own message


def with_base_configs(directory: Path, base_model: str, dtype: str, trust_remote_code: bool,
                      missing: tuple[str, ...] = ()):
    """The model of `directory`, its missing config.json / generation_config.json taken from the base
    model (as a repair would copy them), read-only."""
    if CONFIG_NAME not in missing:
        model = load_model(directory, dtype, trust_remote_code)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_model, local_files_only=True, trust_remote_code=trust_remote_code)
        model = load_model(directory, dtype, trust_remote_code, config=config)
    if GENERATION_CONFIG_NAME in missing and (Path(base_model) / GENERATION_CONFIG_NAME).exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(base_model, local_files_only=True)
    return model


def model_shapes_for_config(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the architecture described by `config_dir`/config.json (no memory used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_mismatch(weights: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why these weights do not fit that architecture (None when they fit). Tied weights may be absent."""
    for name, shape in weights.items():
        if name not in expected:
            return f"tensor {name} does not exist in the base model's architecture"
        if expected[name] != shape:
            return f"tensor {name} has shape {list(shape)}, the base model's config needs {list(expected[name])}"
    missing = [n for n in expected if n not in weights and not n.startswith("lm_head.")]
    if missing:
        return f"{len(missing)} tensors of the architecture are missing (e.g. {missing[0]})"
    return None


def _recorded_lora(model: IterationModel, directory: Path, lora: dict | None) -> dict | None:
    from itertrain.lora.links import LORA

    manifest = None if model.foreign else read_manifest(directory)
    return manifest.extra.get(LORA) if manifest is not None else lora


def repair_problem(model: IterationModel, root: Path, base_model: str, lora: dict | None = None) -> str | None:
    """Why the missing config files of `model` cannot be recreated from the base model (its weights do
    not fit the base architecture, or no recorded LoRA settings fit the adapter); None when they can.
    Reads headers and configs only: writes nothing (the repair itself waits until every rank accepted
    the plan)."""
    directory, base = root / model.path, Path(base_model)
    if CONFIG_NAME in model.missing_aux:
        problem = shape_mismatch(weight_shapes(directory), model_shapes_for_config(base))
        if problem:
            return f"{CONFIG_NAME} is missing and the base model's config does not fit: {problem}"
    if ADAPTER_CONFIG_NAME in model.missing_aux:
        from itertrain.lora.files import adapter_config_problem

        settings = _recorded_lora(model, directory, lora)
        if not settings:
            return f"{ADAPTER_CONFIG_NAME} is missing and no LoRA settings are recorded to recreate it from"
        return adapter_config_problem(directory, settings, base)[0]
    return None


def repair_iteration_model(model: IterationModel, root: Path, base_model: str, tokenizer_dir: str | None,
                           lora: dict | None = None) -> list[str]:
    """Recreate missing config/tokenizer/generation files from the base model, and a missing
    adapter_config.json of an adapter-only model from the LoRA settings its manifest recorded (the
    run's `lora` settings for one written by another tool), then commit the model again. Rank 0, once
    every rank accepted the plan.

    Returns report lines; raises ValueError when the weights do not fit the base architecture.
    """
    directory = root / model.path
    base = Path(base_model)
    problem = repair_problem(model, root, base_model, lora)
    if problem:
        raise ValueError(problem)
    notes: list[str] = []
    if ADAPTER_CONFIG_NAME in model.missing_aux:
        from itertrain.lora.files import rebuild_adapter_config

        rebuild_adapter_config(directory, _recorded_lora(model, directory, lora), base)  # type: ignore[arg-type]
        notes.append(f"🔧 created missing {ADAPTER_CONFIG_NAME} in {model.path} from the recorded LoRA settings "
                     "(tensor shapes checked)")
    tok_src = Path(tokenizer_dir) if tokenizer_dir else base
    for name in (n for n in model.missing_aux if n != ADAPTER_CONFIG_NAME):
        src = (base if name in (CONFIG_NAME, GENERATION_CONFIG_NAME) else tok_src) / name
        if src.exists():
            shutil.copyfile(src, directory / name)
            checked = " (weight shapes checked)" if name == CONFIG_NAME else ""
            notes.append(f"🔧 created missing {name} in {model.path} from {src.parent}{checked}")
        else:
            notes.append(f"⚠️  {name} is missing in {model.path} and the base model has none to copy")
    if not model.foreign:
        recommit(directory, repaired=list(model.missing_aux))
    return notes


def optimizer_state_problems(state: dict, model: torch.nn.Module) -> list[str]:
    """Does a saved optimizer state fit this model's trainable parameters? (shapes only)"""
    try:
        groups, saved = state["param_groups"], state["state"]
    except (KeyError, TypeError):
        return ["optimizer state has no param_groups/state"]
    params = [p for p in model.parameters() if p.requires_grad]
    n_saved = sum(len(g["params"]) for g in groups)
    if n_saved != len(params):
        return [f"optimizer state covers {n_saved} parameters, the model has {len(params)}"]
    expected = Counter(tuple(p.shape) for p in params)
    got: Counter = Counter()
    for entry in saved.values():
        tensors = [v for v in entry.values() if torch.is_tensor(v) and v.dim() > 0]
        if tensors:
            got[tuple(tensors[0].shape)] += 1
    for shape, n in got.items():
        if n > expected.get(shape, 0):
            return [f"optimizer state holds tensors of shape {list(shape)} that no parameter of the model has"]
    return []


def optimizer_problems(directory: Path, model: torch.nn.Module, scope: StateScope, world_size: int,
                       fsdp: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a checkpoint's optimizer state for this model, in the layout it has."""
    from itertrain.recovery import sharded

    whole = optimizer_file(directory)
    _, fsdp_optimizer = fsdp_dirs(directory)
    under_fsdp = (f"{directory.name} holds FSDP optimizer state, which HF Trainer restores only under --fsdp: "
                  "resume it with the --fsdp setting it was written with")
    if whole is None and fsdp_optimizer is not None:
        problems = sharded.dcp_optimizer_problems(fsdp_optimizer, model)  # metadata only, any world size
        return problems + ([under_fsdp] if scope == StateScope.FULL and not fsdp else []), []
    if whole is None and deepspeed_step_dir(directory) is not None:
        problems = sharded.deepspeed_problems(directory)
        if scope == StateScope.OPTIMIZER:  # DeepSpeed's optimizer files are not weights-only loadable
            return problems, [f"{directory.name} holds DeepSpeed optimizer state, which only DeepSpeed can read: "
                              "the optimizer moments are not carried over, the new iteration starts them fresh"]
        saved = sharded.deepspeed_world_size(directory)
        if saved is not None and saved != world_size:
            problems.append(f"{directory.name} was written by {saved} DeepSpeed rank(s), this run has {world_size}: "
                            "DeepSpeed restores only the same data-parallel size (convert it to a universal "
                            "checkpoint to change it)")
        return problems, []
    path = whole or directory / OPTIMIZER_NAME
    try:
        problems = optimizer_state_problems(safe_load(path), model)
    except FileNotFoundError:
        return [f"{OPTIMIZER_NAME} is missing"], []
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to reject the candidate
        return [describe_load_error(path, e)], []
    full_fsdp = path.name == OPTIMIZER_FSDP_FULL and scope == StateScope.FULL and not fsdp
    return problems + ([under_fsdp] if full_fsdp else []), []


def probe_state(plan: RecoveryPlan, root: Path, model: torch.nn.Module, rank: int, world_size: int, *,
                fsdp: bool = False) -> tuple[list[str], list[str]]:
    """(problems, warnings) for loading the plan's training state on this rank (`fsdp`: this run
    trains under --fsdp)."""
    if plan.state_from is None or plan.state_scope == StateScope.NONE:
        return [], []
    directory = root / plan.state_from
    problems, warnings = optimizer_problems(directory, model, plan.state_scope, world_size, fsdp)
    if plan.state_scope != StateScope.FULL:
        return problems, warnings
    if (directory / SCHEDULER_NAME).exists() or deepspeed_step_dir(directory) is None:  # DeepSpeed may own it
        try:
            safe_load(directory / SCHEDULER_NAME)
        except Exception as e:  # noqa: BLE001
            problems.append(describe_load_error(directory / SCHEDULER_NAME, e))
    try:
        json.loads((directory / TRAINER_STATE_NAME).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{TRAINER_STATE_NAME} does not parse: {e}")
    saved_ws = (plan.checkpoint.world_size if plan.checkpoint else None) or _rng_world_size(directory)
    rng = directory / rng_state_name(rank, world_size)
    if saved_ws is not None and saved_ws != world_size:
        warnings.append(
            f"{plan.state_from} was written by {saved_ws} rank(s), this run has {world_size}: training continues "
            "but is no longer bit-identical to an uninterrupted run (data order and RNG streams differ)"
        )
    elif not rng.exists():
        problems.append(f"{rng.name} (the RNG state of rank {rank}) is missing")
    else:
        try:
            safe_load(rng)
        except Exception as e:  # noqa: BLE001
            problems.append(describe_load_error(rng, e))
    return problems, warnings


def _rng_world_size(directory: Path) -> int | None:
    if (directory / "rng_state.pth").exists():
        return 1
    n = len(list(directory.glob("rng_state_*.pth")))
    return n or None


class OptimizerMomentsCallback(TrainerCallback):
    """Across an iteration boundary: load only the optimizer state (moments and their step counts)
    into the new optimizer; learning rate and other hyperparameters, the scheduler and progress stay
    those of the new iteration. Runs at on_train_begin, after HF created optimizer and scheduler."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        if optimizer is None:
            return control
        from itertrain.recovery import sharded

        whole = optimizer_file(self.checkpoint_dir)
        _, fsdp_optimizer = fsdp_dirs(self.checkpoint_dir)
        if whole is None:
            if fsdp_optimizer is not None:  # sharded (FSDP): DCP reshards to this run's layout
                sharded.carry_dcp_moments(fsdp_optimizer, model, optimizer)
            return control  # DeepSpeed: not carried (the plan's report says so)
        if whole.name == OPTIMIZER_FSDP_FULL:  # keyed by parameter name, possibly into a sharded optimizer
            sharded.carry_named_moments(safe_load(whole), model, optimizer)
            return control
        saved = safe_load(whole)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(saved)
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        return control
