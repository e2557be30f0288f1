"""The training data an iteration was trained on, in the lineage of its checkpoints and model.

The fingerprint is xxh3-128 of the rows as the strategy yields them (`train_rows(iteration)`, as JSON
with sorted keys), not of a file's bytes: one rule covers --train_file, a plug-in's rows and the data
a generating strategy committed, and only a change a training run would see counts (a re-saved file
with the same rows is the same data). A mid-iteration resume (a checkpoint restored in full) on rows
with another fingerprint would continue the iteration on different data: it is refused (exit 2) unless
--allow_config_change, and then the report says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import xxhash

from itertrain.errors import ItertrainError, RecoveryRefused

KEY = "train_data"  # lineage entry: {"source": ..., "fingerprint": ...}


def rows_fingerprint(rows: Iterable[dict[str, Any]]) -> str:
    """xxh3-128 of the rows in order, each as JSON with sorted keys."""
    h = xxhash.xxh3_128()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def current(strategy: Any, iteration: int) -> dict[str, Any] | None:
    """{"source", "fingerprint"} of what `iteration` would train on now; None when the strategy has no
    rows of its own to fingerprint (it builds its dataset another way) or they cannot be read (the
    launch's own checks then say why)."""
    try:
        rows = strategy.train_rows(iteration)
        source = strategy.rows_source(iteration)
    except (NotImplementedError, ItertrainError, OSError, ValueError):
        return None
    if not _finite_rows(rows):
        return None
    return {"source": str(source), "fingerprint": rows_fingerprint(rows)}


def _finite_rows(rows: Any) -> bool:
    """Rows that can be read to their end: a list, a tuple, a datasets.Dataset (any sized iterable that
    is not a string or a mapping). A generator is not fingerprinted: it might never end."""
    return (isinstance(rows, Sized) and isinstance(rows, Iterable)
            and not isinstance(rows, (str, bytes, Mapping)))


def changed(recorded: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """A sentence naming the source and both fingerprints when the data differs, else None."""
    if not isinstance(recorded, dict) or now is None or recorded.get("fingerprint") in (None, now["fingerprint"]):
        return None
    return (f"the training data changed: {now['source']} now has fingerprint {now['fingerprint']}, "
            f"the checkpoint was trained on fingerprint {recorded.get('fingerprint')}"
            + (f" (from {recorded.get('source')})" if recorded.get("source") != now["source"] else ""))


def check_restored(strategy: Any, iteration: int, lineage: dict[str, Any], checkpoint: str,
                   allow_change: bool) -> list[str]:
    """Before anything is written, for a mid-iteration resume: refuse one on different data (exit 2),
    or with `allow_change` return the report line that says it goes on."""
    what = changed(lineage.get(KEY), current(strategy, iteration))
    if what is None:
        return []
    if not allow_change:
        raise RecoveryRefused(
            f"{checkpoint} of iteration {iteration} cannot be continued: {what}. Continuing would train the rest "
            f"of iteration {iteration} on other rows. Put the original data back, restart iteration {iteration} "
            "from its starting model (--resume_from none --resume_from_iteration auto), or pass "
            "--allow_config_change to continue on the new data.")
    return [f"{what} (continuing {checkpoint} on the new data, allowed by --allow_config_change)"]


def status_of(root: Any, arguments: dict[str, Any], plan: Any) -> dict[str, Any] | None:
    """For `itertrain status`: the data a plan's mid-iteration resume would continue on. Compared with
    the rows now for --strategy sft with --train_file or --dataset_name (the rows are theirs); for other strategies
    the recorded fingerprint only (their rows exist once a launch builds the strategy, which compares).
    None when the plan continues no checkpoint or the checkpoint recorded no data."""
    from itertrain.artifacts.manifest import ManifestError, read_manifest
    from itertrain.data import read_jsonl, resolve_path
    from itertrain.sources import dataset_rows, describe
    if plan is None or plan.state_scope.value != "full" or not plan.state_from:  # StateScope.FULL
        return None
    try:
        manifest = read_manifest(root / plan.state_from)
    except ManifestError:
        return None
    recorded = (manifest.lineage if manifest is not None else {}).get(KEY)
    if not isinstance(recorded, dict):
        return None
    out: dict[str, Any] = {"checkpoint": plan.state_from, "source": recorded.get("source"),
                           "fingerprint": recorded.get("fingerprint"), "now": None, "changed": None}
    if arguments.get("strategy", "sft") != "sft" or not (arguments.get("train_file") or arguments.get("dataset_name")):
        return out
    if arguments.get("train_file"):
        path = resolve_path(str(arguments["train_file"]), plan.iteration)
        read = lambda: read_jsonl(path)  # noqa: E731
    else:
        name, config, split = arguments["dataset_name"], arguments.get("dataset_config"), arguments.get("dataset_split", "train")
        path = describe(name, config, split)
        read = lambda: dataset_rows(name, config, split)  # noqa: E731
    try:
        now = {"source": path, "fingerprint": rows_fingerprint(read())}
    except ItertrainError as e:
        now = {"source": path, "fingerprint": f"unreadable ({e})"}
    out["now"], out["changed"] = now["fingerprint"], changed(recorded, now)
    return out


def status_line(data: dict[str, Any]) -> str:
    """The line `itertrain status` prints about it."""
    head = f"  🧾 training data of {data['checkpoint']}: {data['source']} (fingerprint {data['fingerprint']})"
    if data["changed"]:
        return (f"{head} — CHANGED: {data['changed']}; a launch refuses to continue it (exit 2) unless "
                "--allow_config_change")
    return head + (": unchanged" if data["now"] else ": compared with the rows when a launch builds the strategy")
