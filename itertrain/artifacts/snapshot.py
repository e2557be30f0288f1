"""The snapshot of `--async_save`: everything HF Trainer's `_save_checkpoint` would write on this rank,
copied into host memory at the save step, so training can go on while a writer puts it on disk.

What a snapshot holds (transformers 5.24, plain DDP or one process):
- the weights as `save_pretrained` would write them (same state-dict pipeline, same shards), copied
  into host buffers, with their safetensors headers;
- the optimizer state as a deep copy whose tensors live in host buffers (`torch.save` of it gives
  HF's `optimizer.pt` byte for byte);
- every small file rendered *now* by HF's own code into a private scratch directory and kept as
  bytes: config, generation config, tokenizer files, `training_args.bin` (`Trainer._save` with an
  empty state dict), `scheduler.pt`, `scaler.pt`, this rank's `rng_state*.pth`, `trainer_state.json`.

The host buffers come from a `HostBufferPool`: one set per checkpoint, reused from save to save (no
growth), pinned on CUDA so device->host copies run asynchronously; the snapshot then carries a CUDA
event that the writer waits on before it reads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from itertrain.artifacts.hashed_io import safetensors_header, safetensors_supported, scratch_root


class Unsupported(Exception):
    """This setup cannot be snapshotted: HF's own (synchronous) save is used instead."""


class HostBufferPool:
    """Host staging buffers keyed by a stable name, reused across saves while their size holds.

    Pinned (page-locked) when CUDA is available. A buffer is reused only once the writer that read it
    is done: callers wait for the previous write before taking the next snapshot."""

    def __init__(self, *, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: dict[str, torch.UntypedStorage] = {}

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin).untyped_storage()
            self._buffers[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers.values())

    def release(self) -> None:
        """Free every buffer (between iterations: the memory is not held while nothing is saved)."""
        self._buffers.clear()


# ---- location tags ---------------------------------------------------------------------------------------
# torch.save records each storage's device ("cuda:0") in the pickle; a host copy would say "cpu". The
# host copies of device storages are mapped to the original's tag by their data_ptr while they are
# written, so the file says what HF's says (and loads back onto the same device).
_LOCATIONS: dict[int, str] = {}
_tagger_registered = False


def _location_tag(storage: Any) -> str | None:
    if not _LOCATIONS:
        return None
    try:
        return _LOCATIONS.get(storage.data_ptr())
    except Exception:  # noqa: BLE001 - not a storage torch would tag: let torch's own taggers decide
        return None


def tag_location(copy_: torch.UntypedStorage, original: torch.UntypedStorage) -> int:
    """Make torch.save record `copy_` with `original`'s location; returns the key for `untag`."""
    global _tagger_registered
    if not _tagger_registered:  # priority 0: ahead of torch's cpu/cuda taggers; never used to load
        torch.serialization.register_package(0, _location_tag, lambda storage, location: None)
        _tagger_registered = True
    _LOCATIONS[copy_.data_ptr()] = torch.serialization.location_tag(original)
    return copy_.data_ptr()


def untag(keys: list[int]) -> None:
    for key in keys:
        _LOCATIONS.pop(key, None)


# ---- copies ---------------------------------------------------------------------------------------------
def _tensors(obj: Any, out: dict[int, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)


def copy_tree(obj: Any, pool: HostBufferPool, namespace: str, tagged: list[int]) -> tuple[Any, int]:
    """A deep copy of a state-dict-like tree whose tensors are host copies: (copy, bytes copied).

    Whole storages are copied once and every tensor is rebuilt with the same offset, size and stride,
    so views and shared storages serialize as the originals do. The containers are copied by
    `copy.deepcopy` with a memo seeded with the tensor copies: key order and object sharing (which
    pickle memoizes, e.g. one `betas` tuple in two param groups) are kept, hence the same bytes."""
    found: dict[int, torch.Tensor] = {}
    _tensors(obj, found)
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}
    memo: dict[int, Any] = {}
    nbytes = 0
    for t in found.values():
        src = t.untyped_storage()
        key = (str(src.device), src.data_ptr()) if src.data_ptr() else ("empty", id(t))
        dst = copies.get(key)
        if dst is None:
            dst = pool.storage(f"{namespace}/{len(copies)}", src.nbytes())
            if src.nbytes():
                dst.copy_(src, non_blocking=src.device.type == "cuda")
                if src.device.type != "cpu":
                    tagged.append(tag_location(dst, src))
            copies[key] = dst
            nbytes += src.nbytes()
        new = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if t.requires_grad:
            new.requires_grad_(True)
        memo[id(t)] = new
    return copy.deepcopy(obj, memo), nbytes


# ---- what a snapshot holds ------------------------------------------------------------------------------
@dataclass
class BytesFile:
    """A small file rendered by HF's own code, kept as bytes."""
    rel: str
    data: bytes


@dataclass
class WeightsFile:
    """One safetensors shard: header and host copies of its tensors, in file order."""
    rel: str
    header: bytes
    tensors: list[torch.Tensor]


@dataclass
class TorchFile:
    """An object for `torch.save` whose tensors are host copies (`tagged`: their location tags)."""
    rel: str
    obj: Any
    tagged: list[int] = field(default_factory=list)


SnapshotFile = BytesFile | WeightsFile | TorchFile


@dataclass
class Snapshot:
    """What one rank writes into `checkpoint-S`, held in host memory, in HF's order of writing."""
    step: int
    directory: Path
    rank: int
    world_size: int
    files: list[SnapshotFile] = field(default_factory=list)
    ready: Any = None  # a torch.cuda.Event after the device->host copies (None on CPU)
    tensor_bytes: int = 0
    seconds: float = 0.0

    def synchronize(self) -> None:
        """Wait for the device->host copies (the writer calls it before it reads a buffer)."""
        if self.ready is not None:
            self.ready.synchronize()


def unsupported_reason(trainer: Any, trial: Any = None) -> str | None:
    """Why this trainer's checkpoints cannot be snapshotted (None when they can)."""
    from transformers import PreTrainedModel
    from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

    args = trainer.args
    for bad, why in (
        (trial is not None or trainer.hp_search_backend is not None, "hyper-parameter search"),
        (getattr(trainer, "is_deepspeed_enabled", False), "DeepSpeed"),
        (getattr(trainer, "is_fsdp_enabled", False), "FSDP"),
        (is_torch_xla_available(), "XLA"),
        (is_sagemaker_mp_enabled(), "SageMaker model parallel"),
        (bool(args.push_to_hub), "--push_to_hub (uploads need the files on disk)"),
        (getattr(trainer, "is_distributed_loading_by_transformers", False), "a model sharded at load time"),
    ):
        if bad:
            return why
    model = trainer.model
    if not isinstance(model, PreTrainedModel):
        return f"the model is a {type(model).__name__}, not a PreTrainedModel"
    if getattr(model, "_hf_peft_config_loaded", False) or hasattr(model, "peft_config"):
        return "PEFT adapters"
    if getattr(model, "hf_quantizer", None) is not None:
        return "a quantized model"
    device_map = getattr(model, "hf_device_map", None) or {}
    if "cpu" in device_map.values() or "disk" in device_map.values():
        return "an offloaded model"
    if getattr(model, "_tp_size", None) or getattr(model.config, "distributed_config", None) is not None:
        return "tensor parallelism"
    if any(not safetensors_supported(p.dtype) for p in model.state_dict().values()):
        return "a weight dtype safetensors cannot store"
    return None


# The HF code the async path repeats step by step (async_save.py, this file), as in transformers 5.24. A
# release that changes it must be read again before these fingerprints are updated; until then
# `--async_save` is refused there (a checkpoint that differs from HF's own would be worse than a slow one).
MIRRORED = {
    "Trainer._save_checkpoint": "a9111e30faa9",
    "Trainer._save_optimizer_and_scheduler": "c5ef974db69a",
    "Trainer._save": "b136889e8792",
    "PreTrainedModel.save_pretrained": "979de0ea85d7",
}


def mirrored_fingerprints() -> dict[str, str]:
    """The installed transformers' fingerprints of the methods in `MIRRORED`."""
    import hashlib
    import inspect

    from transformers import PreTrainedModel, Trainer

    owners = {"Trainer": Trainer, "PreTrainedModel": PreTrainedModel}
    found = {}
    for name in MIRRORED:
        owner, attr = name.split(".")
        source = inspect.getsource(getattr(owners[owner], attr))
        found[name] = hashlib.sha256(source.encode()).hexdigest()[:12]
    return found


def launch_refusal(*, use_peft: bool, sharded: str | None, push_to_hub: bool) -> str | None:
    """Why `--async_save` is refused for this launch (None when it is not): checked before anything is
    written, so the user hears it at once instead of getting synchronous saves without asking."""
    if use_peft:
        return ("--async_save with --use_peft: LoRA adapter checkpoints are not snapshotted (they are small: "
                "HF's synchronous save costs little there); drop --async_save")
    if sharded:
        return (f"--async_save with {sharded}: sharded training state is not snapshotted; drop --async_save "
                f"or {sharded}")
    if push_to_hub:
        return "--async_save with --push_to_hub: uploads need the files on disk at the save step; drop one of them"
    changed = sorted(k for k, v in mirrored_fingerprints().items() if MIRRORED[k] != v)
    if changed:
        import transformers

        return (f"--async_save repeats HF's save code of transformers 5.24 step by step, and transformers "
                f"{transformers.__version__} differs in {', '.join(changed)}: its checkpoints could differ from HF's "
                "own; drop --async_save")
    return None


def _read_scratch(scratch: str, keep: Callable[[str], bool]) -> list[BytesFile]:
    """The files HF wrote into `scratch`, in the order it wrote them."""
    found = []
    for dirpath, _, names in os.walk(scratch):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, scratch).replace(os.sep, "/")
            if keep(rel):
                found.append((os.stat(full).st_mtime_ns, rel, full))
    return [BytesFile(rel, Path(full).read_bytes()) for _, rel, full in sorted(found)]


def _weights(model: Any, pool: HostBufferPool) -> tuple[list[SnapshotFile], int]:
    """The weights as `save_pretrained` writes them (transformers 5.24, modeling_utils.py 3500-3623)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    state_dict = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state_dict.pop(key, None)
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    state_dict = revert_weight_conversion(model, state_dict)
    split = split_torch_state_dict_into_shards(  # Trainer._save passes save_pretrained's default, 50GB
        state_dict, filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size="50GB")
    files: list[SnapshotFile] = []
    nbytes = 0
    for shard_file, names in split.filename_to_tensors.items():
        shard = {n: state_dict[n] for n in names}
        header, order = safetensors_header(shard, {"format": "pt"})
        copies = []
        for name in order:
            src = shard[name].detach()
            size = src.numel() * src.element_size()
            dst = torch.empty(0, dtype=src.dtype).set_(pool.storage(f"weights/{name}", size), 0, src.shape)
            dst.copy_(src, non_blocking=src.device.type == "cuda")  # contiguous, as save_pretrained's
            copies.append(dst)
            nbytes += size
        files.append(WeightsFile(shard_file, header, copies))
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        files.append(BytesFile(SAFE_WEIGHTS_INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
    return files, nbytes


def _update_stateful_callbacks(trainer: Any) -> None:
    """What HF's `_save_checkpoint` does before writing trainer_state.json (trainer.py 3403-3412)."""
    from transformers.trainer_callback import ExportableState

    for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control] if isinstance(c, ExportableState)]:
        name, state = cb.__class__.__name__, cb.state()
        if isinstance(trainer.state.stateful_callbacks[name], list):
            trainer.state.stateful_callbacks[name].append(state)
        else:
            trainer.state.stateful_callbacks[name] = state


def take_snapshot(trainer: Any, output_dir: str | os.PathLike[str], pool: HostBufferPool) -> Snapshot:
    """Copy everything HF's `_save_checkpoint` writes on this rank into host memory (training thread).

    Call it where HF writes the files: after `store_flos` and the best-model bookkeeping. Like HF it
    updates `trainer.state.stateful_callbacks`, then renders trainer_state.json. On CUDA the copies
    are only enqueued here; `Snapshot.ready` completes them."""
    reason = unsupported_reason(trainer)
    if reason:
        raise Unsupported(reason)
    args = trainer.args
    started = time.perf_counter()
    snap = Snapshot(trainer.state.global_step, Path(output_dir), args.process_index, args.world_size)
    tagged: list[int] = []
    scratch = tempfile.mkdtemp(prefix="itertrain-snapshot-", dir=scratch_root())
    try:
        if args.should_save:
            # config, generation config, tokenizer, training_args.bin: HF's own Trainer._save, no weights
            trainer._save(scratch, state_dict={})
            meta = _read_scratch(scratch, keep=lambda rel: not (rel.startswith("model") and ".safetensors" in rel))
            shutil.rmtree(scratch)
            os.makedirs(scratch)
            weights, nbytes = _weights(trainer.model, pool)
            snap.tensor_bytes += nbytes
            first = [f for f in meta if f.rel in ("config.json", "generation_config.json")]
            snap.files += first + weights + [f for f in meta if f not in first]
        if not args.save_only_model:
            if args.should_save:
                optimizer, nbytes = copy_tree(trainer.optimizer.state_dict(), pool, "optimizer", tagged)
                snap.tensor_bytes += nbytes
                snap.files.append(TorchFile("optimizer.pt", optimizer, tagged))
                with warnings.catch_warnings(record=True):  # as trainer.py 3571
                    torch.save(trainer.lr_scheduler.state_dict(), os.path.join(scratch, "scheduler.pt"))
            trainer._save_scaler(scratch)
            trainer._save_rng_state(scratch)
        if args.should_save:
            _update_stateful_callbacks(trainer)
            trainer.state.save_to_json(os.path.join(scratch, "trainer_state.json"))
        rest = {f.rel: f for f in _read_scratch(scratch, keep=lambda rel: True)}
        snap.files += [rest.pop(n) for n in ("scheduler.pt", "scaler.pt") if n in rest]
        snap.files += [rest.pop(n) for n in sorted(rest) if n.startswith("rng_state")]
        snap.files += list(rest.values())  # trainer_state.json, last as in HF
    except BaseException:
        untag(tagged)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if torch.cuda.is_available():
        snap.ready = torch.cuda.Event()
        snap.ready.record()  # on the current stream: later in-place updates are ordered after the copies
    snap.seconds = time.perf_counter() - started
    return snap
