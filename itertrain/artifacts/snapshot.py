"""The snapshot of `--async_save`: host copies of the two large things a checkpoint holds (the model's
state dict and the optimizer's), taken at the save step so that training can go on while HF's own
serializers write them from the copies.

- `HostBufferPool`: staging buffers reused from save to save (no growth, no page faults after the
  first save), pinned on CUDA so that device->host copies run asynchronously;
- `copy_tree`: a deep copy of a state-dict-like tree whose tensors live in those buffers (views and
  shared storages kept: tied weights stay tied, `torch.save` pickles the copy as it pickles the original);
- `located_as`: while one `torch.save` of such a copy runs, its storages are recorded with the original's
  device ("cuda:0") instead of "cpu", as HF's own file says (scoped to that write, removed in `finally`);
- `unsupported_reason` / `launch_refusal`: setups whose state is not a plain per-process state dict.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Iterator

import torch


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
# torch.save records each storage's device in the pickle; a host copy of a CUDA storage would say "cpu".
# While one write runs, the copies are mapped to their original's tag by data_ptr. The tagger is
# registered for that write only and removed in `finally`, so no other torch.save ever meets it.
_LOCATIONS: dict[int, str] = {}
_LOCK = threading.Lock()


def _location_tag(storage: Any) -> str | None:
    try:
        return _LOCATIONS.get(storage.data_ptr())
    except Exception:  # noqa: BLE001 - not a storage torch would tag: let torch's own taggers decide
        return None


def _never_restore(storage: Any, location: str) -> None:
    return None


@contextlib.contextmanager
def located_as(tags: dict[int, str]) -> Iterator[None]:
    """Within the block, `torch.save` records the storage at data_ptr `k` with location `tags[k]`."""
    if not tags:
        yield
        return
    registry = torch.serialization._package_registry  # no public unregister: removed by identity below
    with _LOCK:
        _LOCATIONS.update(tags)
        torch.serialization.register_package(0, _location_tag, _never_restore)  # ahead of torch's own taggers
    try:
        yield
    finally:
        with _LOCK:
            registry[:] = [entry for entry in registry if entry[1] is not _location_tag]
            for key in tags:
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


def copy_tree(obj: Any, pool: HostBufferPool, namespace: str, tags: dict[int, str]) -> tuple[Any, int]:
    """A deep copy of a state-dict-like tree whose tensors are host copies: (copy, bytes copied).

    Whole storages are copied once and every tensor is rebuilt with the same offset, size and stride,
    so views and shared storages (tied weights) stay as in the original. The containers are copied by
    `copy.deepcopy` with a memo seeded with the tensor copies: key order and object sharing (which
    pickle memoizes, e.g. one `betas` tuple in two param groups) are kept, hence the same bytes.
    `tags` receives {copy's data_ptr: original's location} for device storages (see `located_as`)."""
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
                    tags[dst.data_ptr()] = torch.serialization.location_tag(src)
            copies[key] = dst
            nbytes += src.nbytes()
        new = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if t.requires_grad:
            new.requires_grad_(True)
        memo[id(t)] = new
    return copy.deepcopy(obj, memo), nbytes


# ---- what cannot be snapshotted ---------------------------------------------------------------------------
def unsupported_reason(trainer: Any, trial: Any = None) -> str | None:
    """Why this trainer's checkpoints cannot be snapshotted (None when they can): the state is not a
    plain state dict held whole by this process, or the files must exist at the save step."""
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
    return None


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
    return None
