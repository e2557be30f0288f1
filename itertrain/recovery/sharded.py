"""Sharded training state, as HF Trainer writes it under FSDP and DeepSpeed: checked without
running any pickled code, restored, and its optimizer moments carried across an iteration boundary.

FSDP with SHARDED_STATE_DICT: `checkpoint-S/pytorch_model_fsdp_0/` and `optimizer_0/`, written by
torch.distributed.checkpoint (DCP): a `.metadata` file (written last, by the coordinator) and one
`__{rank}_{n}.distcp` file per writing rank, each a series of torch archives at known offsets. No
model.safetensors and no optimizer.pt. DCP's reader unpickles `.metadata` with a bare `pickle.load`,
and accelerate's planner loads non-tensor items with `weights_only=False`; here `.metadata` is read
through an allowlist and every non-tensor item is checked for globals beyond weights-only before
anything loads it (tensors are loaded with weights_only=True by DCP itself).

DeepSpeed: `checkpoint-S/latest` names `global_stepN/`, which holds `*_model_states.pt` and per
data-parallel rank `*_optim_states.pt`. The optimizer files pickle DeepSpeed classes (a loss scaler,
an enum, fragment addresses), so they are never loaded here: their globals are listed from the
pickle opcodes and compared with that allowlist. Only DeepSpeed restores them (HF's resume).
"""

from __future__ import annotations

import io
import math
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from itertrain.layout import deepspeed_step_dir
from itertrain.weights import torch_archive_problem

# What `.metadata` may refer to: DCP's own metadata classes and plain containers.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}
# Beyond what weights_only allows, what DeepSpeed's checkpoint files pickle (DeepSpeed 0.19:
# runtime/zero/stage_1_and_2.py, stage3.py, bf16_optimizer.py state_dict()).
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP metadata never needs")


def read_dcp_metadata(directory: Path) -> Any:
    """The DCP Metadata of `directory`, unpickled through an allowlist (never runs other code)."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(Path(directory) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise ValueError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def unsafe_globals(data: Any) -> list[str]:
    """Globals a torch archive's pickle refers to beyond what weights_only allows (opcodes only)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    return get_unsafe_globals_in_checkpoint(data)


def dcp_problems(directory: Path) -> list[str]:
    """Why a DCP directory cannot be loaded, from its metadata and file sizes (no tensor is read)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    d = Path(directory)
    try:
        metadata = read_dcp_metadata(d)
    except FileNotFoundError:
        return [f"{d.name}/.metadata is missing (the save never finished: DCP writes it last)"]
    except Exception as e:  # noqa: BLE001 - any unreadable metadata rejects the directory
        return [f"{d.name}/.metadata was refused: {str(e)[:200]}"]
    problems: list[str] = []
    ends: dict[str, int] = {}
    stored: Counter = Counter()
    for index, info in metadata.storage_data.items():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        stored[index.fqn] += 1
    for rel, end in sorted(ends.items()):
        size = (d / rel).stat().st_size if (d / rel).is_file() else None
        if size is None:
            problems.append(f"{d.name}/{rel} is missing")
        elif size < end:
            problems.append(f"{d.name}/{rel} is truncated ({size} bytes, its items end at {end})")
    if problems:
        return problems
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            covered = sum(math.prod(c.sizes) for c in meta.chunks)
            if covered != math.prod(meta.size) or stored[fqn] != len(meta.chunks):
                problems.append(f"{d.name}: {fqn} is not stored whole ({covered} of {math.prod(meta.size)} elements)")
        elif isinstance(meta, BytesStorageMetadata):
            problems += _bytes_item_problems(d, metadata, fqn)
    stray = sorted(p.name for p in d.glob("*.distcp") if p.name not in ends)
    if stray:
        problems.append(f"{d.name}: files no item refers to: {', '.join(stray)}")
    return problems


def _bytes_item_problems(d: Path, metadata: Any, fqn: str) -> list[str]:
    """A non-tensor item (e.g. an optimizer's param_groups value) must be weights-only loadable."""
    for index, info in metadata.storage_data.items():
        if index.fqn != fqn:
            continue
        if getattr(info, "transform_descriptors", None):
            return [f"{d.name}: {fqn} is stored with transforms this check does not read"]
        with open(d / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            bad = unsafe_globals(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - not a readable archive
            return [f"{d.name}: {fqn} is not a readable torch archive ({str(e)[:120]})"]
        if bad:
            return [f"{d.name}: {fqn} holds a pickle that would run code ({', '.join(bad[:3])})"]
    return []


def dcp_shapes(directory: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Fully qualified name (without `prefix.`) -> global shape of every tensor in a DCP directory."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for fqn, meta in read_dcp_metadata(directory).state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and fqn.startswith(prefix + "."):
            out[fqn[len(prefix) + 1:]] = tuple(meta.size)
    return out


def dcp_optimizer_problems(directory: Path, model: torch.nn.Module) -> list[str]:
    """Does `optimizer_0/` hold moments of the right global shape for every trainable parameter of
    `model`? (metadata only; any world size: DCP reshards on load)"""
    problems = dcp_problems(directory)
    if problems:
        return problems
    shapes = dcp_shapes(directory, "optimizer.state")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq") if p.requires_grad else ():
            got = shapes.get(f"{name}.{key}")
            if got is None:
                return [f"{Path(directory).name} holds no {key} for parameter {name}"]
            if got != tuple(p.shape):
                return [f"{Path(directory).name}: {name}.{key} has shape {list(got)}, the parameter {list(p.shape)}"]
    extra = sorted({k.rsplit(".", 1)[0] for k in shapes} - names)
    if extra:
        return [f"{Path(directory).name} holds state for {len(extra)} parameters the model lacks (e.g. {extra[0]})"]
    return []


def _reader(directory: Path) -> Any:
    """DCP's FileSystemReader, reading `.metadata` through the allowlist."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise ValueError("per-rank DCP metadata is not written by Hugging Face and is not read here")
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _planner() -> Any:
    """DCP's default load planner, with non-tensor items read weights_only (DCP's own uses a full unpickle)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def load_dcp_weights(directory: Path, model: torch.nn.Module) -> None:
    """Fill a whole (unsharded) model from `pytorch_model_fsdp_0/`, on this process alone: every rank
    loads the full weights before training, as it does from safetensors; FSDP shards them later."""
    import torch.distributed.checkpoint as dcp

    saved = dcp_shapes(directory, "model")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in saved and not k.startswith("lm_head."))  # a tied head is not saved
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ValueError(f"{Path(directory).name} does not fit the model: {len(missing)} tensors missing "
                         f"{missing[:2]}, {len(unexpected)} unknown {unexpected[:2]}")
    state = {"model": {k: v for k, v in own.items() if k in saved}}
    dcp.load(state, storage_reader=_reader(directory), planner=_planner(), no_dist=True)
    model.load_state_dict(state["model"], strict=False)


def carry_dcp_moments(directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Load only the optimizer's moments and step counts from `optimizer_0/` into `optimizer` (sharded
    or not, any world size); its hyperparameters stay the new iteration's. Only the `state` subtree
    is requested, so the param_groups items are never read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    fresh = get_optimizer_state_dict(model, optimizer, options=options)  # zero moments, shaped like the model
    target = {"optimizer": {"state": fresh["state"]}}
    dcp.load(target, storage_reader=_reader(directory), planner=_planner())
    set_optimizer_state_dict(model, optimizer, {"state": target["optimizer"]["state"],
                                                "param_groups": fresh["param_groups"]}, options=options)


def carry_named_moments(saved: dict, model: torch.nn.Module, optimizer: Any) -> None:
    """Like `carry_dcp_moments`, from a whole optimizer state keyed by parameter name (FSDP
    FULL_STATE_DICT's `optimizer.bin`, already loaded weights-only); torch shards it as needed."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    fresh = get_optimizer_state_dict(model, optimizer, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": saved["state"], "param_groups": fresh["param_groups"]},
                             options=options)


# ---- DeepSpeed -----------------------------------------------------------------------------------
def deepspeed_problems(checkpoint: Path) -> list[str]:
    """Structure of a DeepSpeed checkpoint (`latest` -> `global_stepN/`), without loading a file."""
    step_dir = deepspeed_step_dir(checkpoint)
    if step_dir is None:
        return ["no DeepSpeed global_stepN directory (or `latest` names one that is missing)"]
    files = sorted(step_dir.glob("*.pt"))
    problems = [] if any(f.name.endswith("model_states.pt") for f in files) else \
        [f"{step_dir.name} holds no *_model_states.pt"]
    for f in files:
        why = torch_archive_problem(f)
        if why is None:
            extra = sorted(set(unsafe_globals(f)) - DEEPSPEED_GLOBALS)
            why = f"{f.name} holds a pickle that would run code ({', '.join(extra[:3])})" if extra else None
        if why:
            problems.append(f"{step_dir.name}/{why}")
    return problems


def deepspeed_world_size(checkpoint: Path) -> int | None:
    """The data-parallel size a DeepSpeed checkpoint was written with (one optimizer file per rank)."""
    step_dir = deepspeed_step_dir(checkpoint)
    n = len(list(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))) if step_dir else 0
    return n or None
