"""Model weights on disk, read without the recovery machinery: the dtype names of `--model_dtype`,
loading an HF model directory, and safetensors headers (names and shapes, no tensor data).

The floor below `lora/`, `recovery/` and `rewards.py`: each of them loads or inspects weights.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from itertrain.layout import ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def dtype_of(name: str) -> Any:
    """The torch dtype for a `--model_dtype` value ("auto" stays "auto": transformers picks)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def resolved_dtype(directory: Path, name: str) -> str:
    """The dtype `from_pretrained(dtype=name)` gives the model in `directory`: "auto" is the config's
    `dtype` (`torch_dtype` in older configs), float32 without one. (vLLM's own "auto" would pick
    bfloat16 for a float32 checkpoint, sampling other numbers than the HF backend.)"""
    if name != "auto":
        return name
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def load_model(directory: Path, dtype: str, trust_remote_code: bool, **kwargs: Any):
    """A causal LM from an HF model directory, offline."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype_of(dtype), local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
    )


_MAX_HEADER = 100 << 20


def safetensors_header(path: Path) -> dict:
    """Parse a safetensors file's JSON header (tensor names, dtypes, shapes, offsets) without reading tensors."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER:
            raise ValueError(f"implausible safetensors header length {n}")
        header = f.read(n)
        if len(header) != n:
            raise ValueError("safetensors header is truncated")
        meta = json.loads(header)
        f.seek(0, 2)
        size = f.tell()
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return meta


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a directory's safetensors weights (single file or sharded with index)."""
    directory = Path(directory)
    files: list[Path]
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"sharded weights incomplete: missing {', '.join(missing)}")
    elif (directory / SAFE_WEIGHTS_NAME).exists():
        files = [directory / SAFE_WEIGHTS_NAME]
    elif (directory / ADAPTER_SAFE_WEIGHTS_NAME).exists():  # a LoRA checkpoint or adapter-only model
        files = [directory / ADAPTER_SAFE_WEIGHTS_NAME]
    else:
        raise ValueError("no safetensors weights (model.safetensors, an index, or adapter_model.safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"])
        absent = listed - set(shapes)
        if absent:
            raise ValueError(f"index names {len(absent)} tensors that no shard holds (e.g. {sorted(absent)[0]})")
    return shapes


def holds_adapter_only(directory: Path) -> bool:
    """A LoRA adapter directory (PEFT's layout): adapter weights and no full model weights."""
    directory = Path(directory)
    return (directory / ADAPTER_SAFE_WEIGHTS_NAME).exists() and not (
        (directory / SAFE_WEIGHTS_NAME).exists() or (directory / SAFE_WEIGHTS_INDEX_NAME).exists())


def torch_archive_problem(path: Path) -> str | None:
    """Why `path` is not a torch archive (a zip with a data.pkl), None when it is."""
    if not zipfile.is_zipfile(path):
        return f"{path.name} is not a readable torch archive"
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return f"{path.name} is not a torch archive (no data.pkl)"
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path.name} is not a readable archive: {e}"
    return None
