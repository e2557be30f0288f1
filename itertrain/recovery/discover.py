"""Discovery: read an output directory into plain dataclasses (metadata only, no weights read).

The layout's scanner finds artifact directories by name; each registered artifact kind
(`kinds.py`) picks its own and classifies each one from its manifest header (or, for directories
written by other tools, a structural check).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from itertrain.artifacts.manifest import ManifestError, read_manifest
from itertrain.layout import AUX_RE, scan
from itertrain.recovery import kinds
from itertrain.recovery.inventory import (  # noqa: F401 - the names discovery's callers import from here
    GROUPS,
    DataArtifact,
    Inventory,
    IterationModel,
    Status,
    TrainerCheckpoint,
    mark_stale,
)


def missing_aux(root: str | Path, model: IterationModel) -> IterationModel:
    """`model` with `missing_aux` filled: the config/tokenizer files its manifest lists that are gone.

    Not part of discovery (that would read every model's full manifest); the recovery shell asks
    for the model it chose, `itertrain status` for every model it shows."""
    if model.foreign or model.status != Status.COMMITTED:
        return model
    directory = Path(root) / model.path
    try:
        manifest = read_manifest(directory)
    except ManifestError:
        return model
    if manifest is None:
        return model
    aux = tuple(rel for rel in manifest.files if AUX_RE.match(rel) and not os.path.exists(directory / rel))
    return replace(model, missing_aux=aux)


def discover(output_dir: str | Path, record: dict | None = None) -> Inventory:
    """Every artifact under `output_dir` of every registered kind, classified.

    `record` is the parsed itertrain.json (read with `experiment.load_record` when not given, which
    refuses a corrupt one). Inside an itertrain experiment a manifest-less directory is torn, unless
    the record lists it as adopted from another tool; outside one, such directories are foreign and
    get a structural check.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return Inventory(str(root), False)
    if record is None:
        from itertrain.experiment import load_record

        record = load_record(root)
    is_experiment = bool(record)
    adopted = frozenset(record.get("adopted", [])) if record else frozenset()
    found = kinds.Scan(root, is_experiment, adopted, scan(root))
    for kind in kinds.registered():  # in order: a kind may read what the kinds before it found
        found.found[kind.group] = kind.discover(found)
    groups = {g: tuple(found.found.get(g, ())) for g in GROUPS}
    others = {g: tuple(a) for g, a in found.found.items() if g not in GROUPS}
    return Inventory(str(root), is_experiment, groups["checkpoints"], groups["iteration_models"], groups["data"],
                     others)
