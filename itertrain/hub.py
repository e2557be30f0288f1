"""--push_to_hub: each committed iteration model goes to the Hub as revision (branch) `iter_K`.

Pushed only once its commit has happened (its manifest is on disk), never before: the Trainer's own push
(checkpoints, mid-iteration) is turned off. A failed upload does not stop training: it is reported and
retried after the next commit (and by the next launch). What has been pushed is kept in itertrain.json
under "hub", with the identity of each model pushed, so a relaunch pushes only what is missing, and an
iteration retrained since (the earlier model superseded) is pushed again. Rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itertrain.artifacts.manifest import fingerprint
from itertrain.experiment import load_record
from itertrain.fsutil import atomic_write_json
from itertrain.layout import EXPERIMENT_RECORD
from itertrain.metrics import committed_metrics

# The model only: iter_K/ may also hold trainer checkpoints (the optimizer moments carried to the next
# iteration, or all of them under --keep_iteration_checkpoints), which are not part of the model.
IGNORE = ["checkpoint-*", "checkpoint-*/*"]
RECORD_KEY = "hub"  # itertrain.json: {"repo_id": ..., "pushed": {"iter_K": commit id}, "models": {"iter_K": id}}


def repo_id(root: Path, args: Any) -> str:
    """--hub_model_id, else the output directory's name (as HF's Trainer names it)."""
    return args.hub_model_id or Path(root).resolve().name


def revision(iteration: int) -> str:
    return f"iter_{iteration}"


def push_committed(root: Path, args: Any) -> list[str]:
    """Push every committed iteration model not pushed yet, oldest first; stop at the first failure (the
    rest wait for the next commit). Returns report lines. A no-op without --push_to_hub."""
    if not getattr(args, "push_to_hub", False):
        return []
    from huggingface_hub import HfApi

    root, repo = Path(root), repo_id(root, args)
    record = load_record(root)
    hub = record.get(RECORD_KEY) if isinstance(record.get(RECORD_KEY), dict) else {}
    same_repo = hub.get("repo_id") == repo
    pushed = dict(hub["pushed"]) if same_repo and isinstance(hub.get("pushed"), dict) else {}
    models = dict(hub["models"]) if same_repo and isinstance(hub.get("models"), dict) else {}
    now = {revision(int(r["iteration"])): fingerprint(root / revision(int(r["iteration"])))
           for r in committed_metrics(root)}
    # an iteration retrained since its push (the pushed model superseded) is pushed again
    todo = [int(rev[5:]) for rev, fp in now.items() if rev not in pushed or models.get(rev, fp) != fp]
    if not todo:
        return []
    api = HfApi(token=args.hub_token)
    lines = []
    try:
        api.create_repo(repo, private=args.hub_private_repo, exist_ok=True)
        for k in todo:
            api.create_branch(repo, branch=revision(k), exist_ok=True)
            info = api.upload_folder(repo_id=repo, folder_path=str(root / revision(k)), revision=revision(k),
                                     commit_message=f"itertrain: iteration model iter_{k}", ignore_patterns=IGNORE)
            pushed[revision(k)] = str(getattr(info, "oid", "") or "")
            models[revision(k)] = now[revision(k)]
            atomic_write_json(root / EXPERIMENT_RECORD, {**load_record(root), RECORD_KEY: {
                "repo_id": repo, "pushed": pushed, "models": models}})
            lines.append(f"⬆️  iter_{k} pushed to the Hub: {repo}, revision {revision(k)}")
    except Exception as e:  # noqa: BLE001 - any upload failure (network, auth, quota): training goes on
        waiting = ", ".join(revision(k) for k in todo if models.get(revision(k)) != now[revision(k)])
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        lines.append(f"⚠️  push to the Hub ({repo}) failed: {first}. Training goes on; {waiting} will be pushed "
                     "after the next commit (or by the next launch)")
    return lines
