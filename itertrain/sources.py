"""Where the user's data and base model come from: `--dataset_name` / `--dataset_config` / `--dataset_split`
(training rows from a `datasets` dataset), and a Hub id in `--model_name_or_path` (resolved in the local cache).

The name is what `datasets.load_dataset` takes: a folder of data files (json, jsonl, parquet, csv), one
data file, or a Hub id (`datasets` follows HF_HUB_OFFLINE: offline, it must be in the local cache).
A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` is read with `load_from_disk`.
The rows are what a strategy trains on, so the lineage fingerprints them as it fingerprints --train_file's
rows: a changed dataset under the same name is caught on resume.

A Hub model id resolves to its snapshot directory in the local Hugging Face cache (HF_HUB_CACHE, revision
`main`); nothing is downloaded. Everything after the parse sees that directory, so the base model's
fingerprint in the lineage is the snapshot's, and iteration models stay local committed directories.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from itertrain.errors import UsageError

DATA_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def describe(name: str, config: str | None, split: str) -> str:
    """The dataset as messages and the lineage name it."""
    return f"dataset {name}" + (f" ({config})" if config else "") + f", split {split}"


def looks_like_path(name: str) -> bool:
    """A name meant as a local path (it exists, is spelled as one, or ends as a data file), not a Hub id."""
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or Path(name).suffix.lower() in DATA_FILES)


def dataset_rows(name: str, config: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """The rows of the split, as dicts without the empty (None) fields that a shared schema adds. Read
    afresh at every call (memory-mapped Arrow: cheap), so that what is fingerprinted is what is on disk now.
    UsageError (exit 2) naming the dataset when it cannot be read."""
    return [{k: v for k, v in row.items() if v is not None} for row in load(name, config, split)]


def load(name: str, config: str | None, split: str) -> Any:
    """The split as a datasets.Dataset."""
    import datasets

    datasets.disable_progress_bars()
    what = describe(name, config, split)
    path = Path(name).expanduser()
    saved = path.is_dir() and any((path / f).is_file() for f in _SAVED)
    if config and (saved or path.is_file()):  # load_from_disk and a lone data file have no configurations
        raise UsageError(f"--dataset_config {config}: {name} is a "
                         f"{'save_to_disk directory' if saved else 'data file'}, which has no configurations; drop "
                         "--dataset_config (it is for a Hub dataset or a dataset folder that defines them)")
    if saved:
        return _from_disk(path, split, what)
    if looks_like_path(name) and not path.exists():
        raise UsageError(f"--dataset_name {name} does not exist: pass a dataset directory (save_to_disk output or "
                         "a folder of json/parquet files), a data file, or a Hub id already in the local cache")
    builder = DATA_FILES.get(path.suffix.lower()) if path.is_file() else None
    try:
        if builder is not None:
            return datasets.load_dataset(builder, data_files=str(path), split=split)
        return datasets.load_dataset(str(path) if path.exists() else name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, missing split, bad file)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if path.exists():
            raise UsageError(f"{what} cannot be read: {first}") from e
        from huggingface_hub import constants

        where = ("is not in the local cache (HF_HUB_OFFLINE=1: nothing is downloaded at run time)"
                 if constants.HF_HUB_OFFLINE else "cannot be loaded from the Hub")
        raise UsageError(
            f"--dataset_name {name}: not a local path, and the Hub dataset {where} ({first}). Fetch it beforehand "
            f"(huggingface-cli download --repo-type dataset {name}), or pass a local dataset directory or data "
            "file") from e


def _from_disk(path: Path, split: str, what: str) -> Any:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{what} cannot be read: {(str(e).strip().splitlines() or [''])[0][:300]}") from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UsageError(f"{what}: {path} has the splits {', '.join(saved)}; pass one with --dataset_split")
        return saved[split]
    return saved


def resolve_model(name: str, flag: str = "--model_name_or_path", need: str | None = "config.json") -> str:
    """A local model directory as it is; a Hub id as its snapshot directory in the local cache. UsageError
    (exit 2) for a path that is not a model directory (holding `need`), or an id that is not in the cache."""
    path = Path(name).expanduser()
    local = path.is_dir() and (need is None or (path / need).is_file())
    if local or looks_like_path(name) or not _is_repo_id(name):
        if local:
            return name
        what = "does not exist" if not path.exists() else f"is not a model directory (no {need})"
        raise UsageError(f"{flag} {name} {what}. itertrain never downloads models: pass a local Hugging Face model "
                         f"directory, a Hub id already in the local cache, or create a tiny model with "
                         f"`itertrain init-model {name}`")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise UsageError(
            f"{flag} {name}: no local directory of that name, and the Hub model {name} is not in the local cache "
            f"({_cache_dir()}). Nothing is downloaded at run time: fetch it beforehand (huggingface-cli download "
            f"{name}), or pass a local model directory") from e
    if need is not None and not (Path(snapshot) / need).is_file():
        raise UsageError(f"{flag} {name}: its snapshot in the local cache ({snapshot}) has no {need}; fetch the "
                         f"whole model beforehand (huggingface-cli download {name})")
    return snapshot


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
