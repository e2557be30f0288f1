"""The experiment layout: names, artifact kinds, what a checkpoint holds, the one scanner and
the one ordering. Everything that reads or writes an output directory takes its names from here.

To change how the newest checkpoint is chosen, change `checkpoint_order`; to change what a trainer
checkpoint holds, change the file-name groups below. Pure: no torch (the plan tests import it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

# HF's own file names (transformers.utils defines them; a test guards that they agree). Written out
# here because importing transformers.utils imports torch on transformers 4.x, and this module is pure.
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"

# ---- directory and file names of an experiment -------------------------------------------------
EXPERIMENT_RECORD = "itertrain.json"
LOCK_NAME = ".itertrain.lock"
MANIFEST_NAME = "itertrain.manifest.json"
SUPERSEDED_DIR = "superseded"
EVAL_SCRATCH_DIR = ".itertrain-eval"  # vLLM evaluation's model copies, one per rank; removed at each launch
RUNS_DIR = "runs"
DATA_DIR = "data"
BASE = "base"  # a weights source meaning --model_name (a plan's weights_from, an adapter's base)
BASE_MODEL_DIR = "base_model"  # the guide's layout: the model of iteration 0, written by another tool
DEMO_EXPERIMENT = "experiment"  # `itertrain demo --output_dir D` keeps its experiment in D/experiment
DEMO_DPO_EXPERIMENT = "experiment-dpo"  # and `itertrain demo --strategy iterative_dpo` in D/experiment-dpo
DEMO_GRPO_EXPERIMENT = "experiment-grpo"  # and `itertrain demo --strategy grpo` in D/experiment-grpo

CHECKPOINT_PREFIX = "checkpoint"  # = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR (guarded by a test)
CHECKPOINT_RE = re.compile(r"^checkpoint-([0-9]+)$")
ITERATION_RE = re.compile(r"^iter_([0-9]+)$")

# ---- what HF Trainer writes into checkpoint-S -------------------------------------------------------
# transformers.trainer defines these next to the Trainer (importing torch); tests guard the equality.
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINING_ARGS_NAME = "training_args.bin"
RNG_STATE_SINGLE = "rng_state.pth"
FSDP_MODEL_PREFIX = "pytorch_model_fsdp"  # FSDP SHARDED_STATE_DICT: pytorch_model_fsdp_0/ (DCP)
FSDP_OPTIMIZER_PREFIX = "optimizer"  # FSDP SHARDED_STATE_DICT: optimizer_0/ (DCP)
FSDP_DIR_RE = re.compile(rf"^({FSDP_MODEL_PREFIX}|{FSDP_OPTIMIZER_PREFIX})_[0-9]+$")
DEEPSPEED_STEP_RE = re.compile(r"^global_step[0-9]+$")
DEEPSPEED_LATEST = "latest"  # DeepSpeed's pointer to the global_stepN/ of a checkpoint

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, ADAPTER_SAFE_WEIGHTS_NAME)
TORCH_STATE_FILES = (OPTIMIZER_NAME, SCHEDULER_NAME)  # torch archives a full restore reads
OPTIMIZER_FSDP_FULL = "optimizer.bin"  # FSDP FULL_STATE_DICT (HF's default): the whole state, by parameter name
# Files of an iteration model that can be recreated from the base model when missing.
AUX_RE = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|vocab\..*|merges\.txt|chat_template.*"
    r"|adapter_config\.json)$"
)


def rng_state_name(rank: int, world_size: int) -> str:
    """The RNG file HF Trainer writes for `rank` (one file on a single process)."""
    return RNG_STATE_SINGLE if world_size <= 1 else f"rng_state_{rank}.pth"


def optimizer_file(checkpoint: str | Path) -> Path | None:
    """The optimizer state file of a checkpoint: `optimizer.pt`, or FSDP FULL_STATE_DICT's
    `optimizer.bin`; None when the optimizer state is sharded (or missing)."""
    for name in (OPTIMIZER_NAME, OPTIMIZER_FSDP_FULL):
        if (Path(checkpoint) / name).exists():
            return Path(checkpoint) / name
    return None


def fsdp_dirs(checkpoint: str | Path) -> tuple[Path | None, Path | None]:
    """(sharded weights, sharded optimizer) directories of a checkpoint HF wrote under FSDP with
    SHARDED_STATE_DICT (`pytorch_model_fsdp_0/`, `optimizer_0/`), None where absent."""
    found: dict[str, Path] = {}
    for e in _entries(str(checkpoint)):
        if _is_dir(e) and (m := FSDP_DIR_RE.match(e.name)):
            found.setdefault(m.group(1), Path(checkpoint) / e.name)
    return found.get(FSDP_MODEL_PREFIX), found.get(FSDP_OPTIMIZER_PREFIX)


def deepspeed_step_dir(checkpoint: str | Path) -> Path | None:
    """The `global_stepN/` of a checkpoint HF wrote under DeepSpeed: the one `latest` names (DeepSpeed
    writes it after every file), else the only one there is."""
    checkpoint = Path(checkpoint)
    try:
        tag = (checkpoint / DEEPSPEED_LATEST).read_text().strip()
    except OSError:
        tag = None
    if tag is not None:
        return checkpoint / tag if DEEPSPEED_STEP_RE.match(tag) and (checkpoint / tag).is_dir() else None
    steps = [Path(checkpoint) / e.name for e in _entries(str(checkpoint)) if _is_dir(e) and DEEPSPEED_STEP_RE.match(e.name)]
    return steps[0] if len(steps) == 1 else None


class Kind(str, Enum):
    TRAINER_CHECKPOINT = "trainer_checkpoint"
    ITERATION_MODEL = "iteration_model"
    DATA = "data"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration}"


def data_name(iteration: int) -> str:
    """The generated data of iteration K, relative to the output dir."""
    return f"{DATA_DIR}/{iteration_name(iteration)}"


def parse_iteration_name(name: str) -> int | None:
    m = ITERATION_RE.match(name)
    return int(m.group(1)) if m else None


def experiment_dir(path: str | Path) -> Path:
    """The experiment a user means: DIR itself, or DIR/experiment (else DIR/experiment-dpo, DIR/experiment-grpo)
    when DIR is a demo's --output_dir."""
    from itertrain.errors import UsageError

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory: pass an experiment's --output_dir")
    if (root / EXPERIMENT_RECORD).exists():
        return root
    return next((root / name for name in (DEMO_EXPERIMENT, DEMO_DPO_EXPERIMENT, DEMO_GRPO_EXPERIMENT)
                 if (root / name / EXPERIMENT_RECORD).exists()), root)


def is_top_level(rel: str) -> bool:
    """A checkpoint directly under the output dir (not kept inside an iteration model)."""
    return "/" not in rel


# ---- the scanner -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """An artifact directory found by name: what it is by its place, before anything is read."""

    rel: str  # relative to the output dir, posix
    kind: Kind | str  # a registered artifact kind's name for kinds beyond these (recovery/kinds.py)
    number: int  # step of a checkpoint, iteration of a model or data
    symlink: bool  # the entry itself is a symbolic link (listed, used read-only, never written through)


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link: a symlinked artifact is listed for what it is
    except OSError:
        return False


def scan(root: str | Path, *, inside_models: bool = True) -> list[Entry]:
    """Every artifact directory of an experiment, by name: top-level checkpoints, iteration models
    (`iter_K`, the guide's `base_model/`), checkpoints kept inside iteration models, generated data."""
    root = str(root)
    out: list[Entry] = []
    models: list[Entry] = []
    for e in _entries(root):
        if not _is_dir(e):
            continue
        link = e.is_symlink()
        if m := CHECKPOINT_RE.match(e.name):
            out.append(Entry(e.name, Kind.TRAINER_CHECKPOINT, int(m.group(1)), link))
        elif (k := parse_iteration_name(e.name)) is not None or e.name == BASE_MODEL_DIR:
            models.append(Entry(e.name, Kind.ITERATION_MODEL, k or 0, link))
    out += models
    if inside_models:
        for model in models:
            for e in _entries(os.path.join(root, model.rel)):
                if (m := CHECKPOINT_RE.match(e.name)) and _is_dir(e):
                    out.append(Entry(f"{model.rel}/{e.name}", Kind.TRAINER_CHECKPOINT, int(m.group(1)),
                                     e.is_symlink()))
    for e in _entries(os.path.join(root, DATA_DIR)):
        if (k := parse_iteration_name(e.name)) is not None and _is_dir(e):
            out.append(Entry(f"{DATA_DIR}/{e.name}", Kind.DATA, k, e.is_symlink()))
    return out


# ---- the one ordering ----------------------------------------------------------------------------
class _Ordered(Protocol):
    path: str
    iteration: int
    foreign: bool
    mtime: float


class _OrderedCheckpoint(_Ordered, Protocol):
    step: int


def checkpoint_order(c: _OrderedCheckpoint) -> tuple:
    """Newest = highest iteration; within it, committed checkpoints by step after (older, adopted)
    ones written by other tools, which are ordered by modification time; a top-level copy
    before a kept one. Serves `auto`, rotation and the optimizer-moment carry alike."""
    return (c.iteration, not c.foreign, c.mtime if c.foreign else c.step, is_top_level(c.path))


def model_order(m: _Ordered) -> tuple:
    """Newest iteration model: highest iteration; an itertrain-committed one before a foreign one."""
    return (m.iteration, not m.foreign, m.mtime)
