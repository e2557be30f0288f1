"""The iteration-model writer: `iter_K` as a self-contained Hugging Face model directory.

Writes the files only; the manifest that commits them is the CommitWorker's job. A failed write is
an ArtifactWriteError naming the path and the cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itertrain import faults
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import describe_library_write_error


def write_iteration_model(model: Any, tokenizer: Any, directory: Path, *, max_shard_size: str,
                          state_dict: dict | None = None) -> None:
    """`save_pretrained` of the weights (sharded above `max_shard_size`), config, generation config
    and tokenizer into `directory` (rank 0). `state_dict`: the whole weights of a sharded model."""
    try:
        faults.point("iteration.save")
        whole = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(directory, max_shard_size=max_shard_size, **whole)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        faults.point("iteration.before_manifest")
    except ArtifactWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/torch report full disks as their own errors
        error = describe_library_write_error(e, directory)
        if error is None:
            raise
        raise ArtifactWriteError(error) from e
