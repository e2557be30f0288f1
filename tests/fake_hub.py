"""Runs `itertrain ARGS` with huggingface_hub.HfApi replaced by a fake (a hub cannot exist here): only the HfApi
object is mocked. Usage: python fake_hub.py CALLS.jsonl FAILS ARGS...: each call is appended to CALLS.jsonl
(with whether the folder's manifest existed when it was uploaded, and the files
an upload would send: those its ignore_patterns leave, matched as huggingface_hub matches them); FAILS is a comma-separated list of
revisions whose first upload raises, as a network failure would."""

from __future__ import annotations

import json
import sys
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub


def main() -> None:
    log, fails, argv = Path(sys.argv[1]), set(filter(None, sys.argv[2].split(","))), sys.argv[3:]

    def note(**call) -> None:
        with open(log, "a") as f:
            f.write(json.dumps(call) + "\n")

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
            note(call="create_repo", repo_id=repo_id)

        def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
            note(call="create_branch", repo_id=repo_id, branch=branch)

        def upload_folder(self, repo_id, folder_path, revision=None, ignore_patterns=None, **kwargs):
            committed = (Path(folder_path) / "itertrain.manifest.json").exists()
            if revision in fails:
                fails.discard(revision)
                note(call="upload_failed", revision=revision)
                raise ConnectionError(f"fake network failure uploading {revision}")
            note(call="upload_folder", repo_id=repo_id, revision=revision, committed=committed,
                 files=sorted(rel for rel in (str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                                              if p.is_file())
                              if not any(fnmatch(rel, pattern) for pattern in ignore_patterns or ())))
            return SimpleNamespace(oid=f"commit-of-{revision}")

    huggingface_hub.HfApi = FakeHfApi
    from itertrain.cli import main as itertrain_main

    sys.exit(itertrain_main(argv))


if __name__ == "__main__":
    main()
