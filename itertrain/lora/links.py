"""The reference from a LoRA adapter to the full model it applies to, recorded and verified.

Every LoRA checkpoint records in its lineage, and every adapter-only iteration model in its manifest,
`adapter_of`: the model the adapter was trained on (the base model, or in merged mode the previous
iteration's model) and a content fingerprint of that model's weights. Before an adapter is used the
fingerprint is compared with the model the plan would apply it to: a checkpoint whose model changed is
rejected (the next older candidate is tried); an adapter-only experiment whose base model changed is
refused outright, naming the base, since nothing in it applies to another model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import xxhash

from itertrain.artifacts.manifest import ManifestError, hash_file, read_manifest
from itertrain.errors import RecoveryRefused
from itertrain.layout import BASE

ADAPTER_OF = "adapter_of"  # lineage (checkpoints) / manifest extra (iteration models): what the adapter applies to
LORA = "lora"  # the LoRA settings an artifact was trained with (manifest extra, lineage)
_WEIGHTS = re.compile(r"^(model|pytorch_model)[^/]*\.(safetensors|bin)(\.index\.json)?$")
_hashed: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> xxh3 of a base model's weight file


def weights_identity(directory: Path) -> str | None:
    """A content fingerprint of a full model's weights: xxh3 over the (name, size, xxh3-128) of its weight
    files, taken from its manifest when itertrain committed it (the checksums deep verification checks),
    else computed (once per process and file version). Unlike `manifest.fingerprint`, it survives a
    repaired config.json, a re-committed manifest, and a copy of the directory. None without weights."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except ManifestError:
        manifest = None
    if manifest is not None:
        entries = [(rel, e.size, e.xxh3) for rel, e in sorted(manifest.files.items()) if _WEIGHTS.match(rel)]
    else:
        entries = []
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if _WEIGHTS.match(path.name) and path.is_file():
                st = path.stat()
                key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if key not in _hashed:
                    _hashed[key] = hash_file(path).xxh3
                entries.append((path.name, st.st_size, _hashed[key]))
    return xxhash.xxh3_64_hexdigest(json.dumps(entries).encode()) if entries else None


def base_dir(root: Path, adapter_base: str, base_model: str) -> Path:
    """The directory of the model an adapter applies to (BASE: --model_name)."""
    return Path(base_model) if adapter_base == BASE else Path(root) / adapter_base


def link_record(root: Path, adapter_base: str, base_model: str) -> dict[str, Any]:
    """`adapter_of` for artifacts trained on `adapter_base`: its path (absolute for the base model,
    relative for an iteration model) and weights fingerprint."""
    directory = base_dir(root, adapter_base, base_model)
    path = str(directory.resolve()) if adapter_base == BASE else adapter_base
    return {"path": path, "base": adapter_base == BASE, "id": weights_identity(directory)}


def lora_lineage(cfg: Any, plan: Any, root: Path) -> dict[str, Any]:
    """What a LoRA iteration's checkpoints and model record: its LoRA settings and `adapter_of`. Rank 0."""
    if not plan.lora:
        return {}
    from itertrain.lora import settings_of

    return {LORA: settings_of(cfg.lora), ADAPTER_OF: link_record(root, plan.adapter_base, cfg.model.model_name)}


def recorded_link(directory: Path) -> dict[str, Any] | None:
    """The `adapter_of` an artifact recorded, None for one without (another tool's, or full fine-tuning)."""
    try:
        manifest = read_manifest(directory)
    except ManifestError:
        return None
    if manifest is None:
        return None
    link = manifest.lineage.get(ADAPTER_OF) or manifest.extra.get(ADAPTER_OF)
    return dict(link) if isinstance(link, dict) else None


def check_links(root: Path, plan: Any, base_model: str) -> dict[str, str]:
    """Rank 0, before anything is loaded: every adapter the plan uses must have been trained on the
    model the plan applies it to. Returns {artifact: reason} to reject; raises RecoveryRefused when the
    base model itself changed under an adapter."""
    if not plan.lora:
        return {}
    uses: dict[str, str] = {}
    if plan.adapter_from:
        uses[plan.adapter_from] = plan.adapter_base
    if plan.lora == "adapter" and plan.previous_model and plan.previous_model != plan.adapter_from:
        uses[plan.previous_model] = BASE  # sampled from at the iteration's start: base + its adapter
    failures: dict[str, str] = {}
    for rel, applies_to in uses.items():
        record = recorded_link(Path(root) / rel)
        if record is None:
            continue
        now = link_record(root, applies_to, base_model)
        if record.get("base") != now["base"] or (not now["base"] and record.get("path") != now["path"]):
            failures[rel] = (f"its LoRA adapter was trained on {record.get('path')}, this plan would apply it to "
                             f"{now['path']}")
        elif record.get("id") != now["id"]:
            if now["base"] and now["id"] is None:
                raise RecoveryRefused(
                    f"{rel} is a LoRA adapter of the base model {record.get('path')} (weights fingerprint "
                    f"{record.get('id')}), which is missing (no weights at {now['path']}). Put the original base "
                    "model back (at --model_name_or_path), or start a new experiment in another --output_dir."
                )
            if now["base"]:
                raise RecoveryRefused(
                    f"{rel} is a LoRA adapter of the base model {record.get('path')} (weights fingerprint "
                    f"{record.get('id')}), but the base model {now['path']} now has weights fingerprint {now['id']}: "
                    "the adapter would apply to a different model. Put the original base model back (at --model_name_or_path), "
                    "or start a new experiment in another --output_dir."
                )
            failures[rel] = (f"its LoRA adapter applies to {now['path']}, whose weights changed since it was trained "
                             f"(fingerprint {record.get('id')}, now {now['id']})")
    return failures


def base_model_problems(root: Path, models: list[str]) -> dict[str, str]:
    """{iteration model: problem} for adapter-only iteration models whose base model (recorded as an
    absolute path with its weights fingerprint) is missing or changed: they cannot be loaded as trained."""
    problems: dict[str, str] = {}
    for rel in models:
        try:
            manifest = read_manifest(Path(root) / rel)
        except ManifestError:
            continue
        # an adapter-only model records adapter_of in its manifest's extra (a merged one, in its lineage only)
        record = manifest.extra.get(ADAPTER_OF) if manifest is not None else None
        if not isinstance(record, dict) or not record.get("base") or not record.get("path"):
            continue
        now = weights_identity(Path(record["path"]))
        if now is None:
            problems[rel] = (f"its LoRA base model {record['path']} is missing (fingerprint {record.get('id')} "
                             "recorded): the adapter cannot be loaded without it; put that model back")
        elif now != record.get("id"):
            problems[rel] = (f"its LoRA base model {record['path']} changed (fingerprint {record.get('id')}, now "
                             f"{now}): the adapter would apply to a different model")
    return problems
