"""CheckpointManager: the one place that commits, rotates, retires and cleans artifacts.

The train loop calls it; HF Trainer reaches it through `CommitCallback` (commit after every save)
and the pre-save hook of `IterationTrainer`. Rank 0 alone writes manifests and deletes; every
commit sits behind a barrier that waits for all ranks' files (SPEC §2, §5).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from itertrain import distributed, faults
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import describe_write_error, safe_move, safe_rmtree
from itertrain.recovery.discover import CHECKPOINT_RE, Inventory, Status
from itertrain.recovery.manifest import (
    DATA,
    ITERATION_MODEL,
    MANIFEST_NAME,
    TRAINER_CHECKPOINT,
    Manifest,
    ManifestError,
    commit_directory,
    read_manifest,
)

SUPERSEDED_DIR = "superseded"


@dataclass
class CheckpointConfig:
    output_dir: Path
    save_total_limit: int | None = None
    keep_iteration_checkpoints: bool = False
    carry_optimizer: bool = True  # keep the newest checkpoint of iteration K until K+1 has its own
    fsync: bool = True
    async_commit: bool = True  # hash, fsync and write manifests on a thread while training goes on
    world_size: int = 1
    lineage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Ckpt:
    path: Path
    iteration: int
    step: int


class CheckpointManager:
    """Owns every write and delete of artifact directories in one experiment."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.root = Path(config.output_dir)
        self.iteration = 0
        self.lineage: dict[str, Any] = dict(config.lineage)
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- trainer checkpoints -------------------------------------------------------------
    def start_iteration(self, iteration: int, lineage: dict[str, Any]) -> None:
        self.iteration = iteration
        self.lineage = {**self.config.lineage, **lineage}

    def wait(self) -> None:
        """Rank 0: finish the checkpoint commit running in the background; raise its error, if any."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def before_save(self, step: int) -> None:
        """Make sure `checkpoint-step` is free before HF writes into it (all ranks call this)."""
        if distributed.is_main():
            self.wait()  # commits land in order; rotation never races a save
            target = self.root / f"checkpoint-{step}"
            if target.exists():
                self._clear_occupied(target)
        distributed.barrier()

    def _clear_occupied(self, target: Path) -> None:
        try:
            manifest = read_manifest(target)
        except ManifestError:
            manifest = None
        if manifest is None:
            # Torn directories were removed after the plan; one without a manifest here was written
            # by another tool (adopted): never delete it.
            self.move_aside([target.name])
        elif manifest.iteration < self.iteration and (self.root / f"iter_{manifest.iteration}").is_dir() and not (
            self.root / f"iter_{manifest.iteration}" / target.name
        ).exists():
            safe_move(target, self.root / f"iter_{manifest.iteration}" / target.name, self.root)
        else:
            self.move_aside([target.name])

    def commit_checkpoint(self, step: int, best: str | None = None) -> None:
        """After HF saved `checkpoint-step` on every rank: manifest (rank 0), rotation, retirement.

        With async_commit the manifest work (fsync + xxh3 of every file, the manifest, rotation) runs
        on a thread while training continues; the checkpoint counts as committed only when its
        manifest lands, so a crash before that leaves it torn and the previous one is used."""
        distributed.barrier()  # every rank's rng file and rank 0's weights/optimizer are on disk
        if not distributed.is_main():
            return
        self.wait()
        if self.config.async_commit:
            self._pending = threading.Thread(target=self._commit_in_background, args=(step, best),
                                             name=f"itertrain-commit-{step}")
            self._pending.start()
        else:
            self._commit_checkpoint(step, best)

    def _commit_in_background(self, step: int, best: str | None) -> None:
        try:
            self._commit_checkpoint(step, best)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e

    def _commit_checkpoint(self, step: int, best: str | None) -> None:
        directory = self.root / f"checkpoint-{step}"
        faults.point("checkpoint.commit")
        self._commit(directory, TRAINER_CHECKPOINT, self.iteration, step, {})
        self._rotate(exclude={directory.name, Path(best).name if best else ""})
        self._retire_stale(before_iteration=self.iteration)

    def _commit(self, directory: Path, kind: str, iteration: int, step: int, extra: dict[str, Any]) -> Manifest:
        try:
            return commit_directory(
                directory, kind=kind, iteration=iteration, step=step, lineage=self.lineage,
                world_size=self.config.world_size, extra=extra, fsync=self.config.fsync,
            )
        except ArtifactWriteError:
            raise
        except OSError as e:
            raise ArtifactWriteError(describe_write_error(e, directory)) from e

    def _top_level(self) -> list[_Ckpt]:
        out = []
        for name in os.listdir(self.root):
            m = CHECKPOINT_RE.match(name)
            if not m:
                continue
            try:
                manifest = read_manifest(self.root / name)
            except ManifestError:
                continue
            if manifest is not None and manifest.kind == TRAINER_CHECKPOINT:
                out.append(_Ckpt(self.root / name, manifest.iteration, manifest.step))
        return out

    def _rotate(self, exclude: set[str]) -> None:
        """--save_total_limit, applied after the new checkpoint committed; never the newest."""
        limit = self.config.save_total_limit
        if not limit or limit < 1:
            return
        mine = sorted((c for c in self._top_level() if c.iteration == self.iteration), key=lambda c: c.step)
        for c in mine[:-limit] if len(mine) > limit else []:
            if c.path.name not in exclude and c is not mine[-1]:
                safe_rmtree(c.path, self.root)

    def _retire_stale(self, before_iteration: int) -> None:
        """Once iteration J has a committed checkpoint, older iterations' checkpoints are not needed."""
        keep = self.config.keep_iteration_checkpoints
        for c in self._top_level():
            if c.iteration < before_iteration:
                self._retire(c, keep)
        if keep:
            return
        for k in range(before_iteration):
            iter_dir = self.root / f"iter_{k}"
            if not iter_dir.is_dir():
                continue
            for name in os.listdir(iter_dir):
                if CHECKPOINT_RE.match(name) and (iter_dir / name).is_dir():
                    safe_rmtree(iter_dir / name, self.root)

    def _retire(self, c: _Ckpt, keep: bool) -> None:
        dest = self.root / f"iter_{c.iteration}" / c.path.name
        if keep and dest.parent.is_dir() and not dest.exists():
            safe_move(c.path, dest, self.root)
        else:
            safe_rmtree(c.path, self.root)

    # ---- iteration models -------------------------------------------------------------------
    def commit_iteration_model(
        self, model, tokenizer, iteration: int, step: int, *, last: bool, max_shard_size: str,
        extra: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None,
    ) -> None:
        """Write iter_K (rank 0), commit it, then retire iteration K's checkpoints. All ranks call."""
        def write() -> None:
            self.wait()
            directory = self.root / f"iter_{iteration}"
            if (directory / MANIFEST_NAME).exists():
                raise ArtifactWriteError(f"{directory} is already committed; refusing to overwrite it")
            try:
                faults.point("iteration.save")
                model.save_pretrained(directory, max_shard_size=max_shard_size)
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
                for name, data in (extra_files or {}).items():
                    (directory / name).write_bytes(data)
                faults.point("iteration.before_manifest")
            except OSError as e:
                raise ArtifactWriteError(describe_write_error(e, directory)) from e
            self._commit(directory, ITERATION_MODEL, iteration, step, extra or {})
            faults.point("iteration.after_manifest")
            self.retire_iteration(iteration, last=last)

        distributed.run_on_main(write)

    def retire_iteration(self, iteration: int, *, last: bool) -> None:
        """iter_K is committed: its checkpoints go, except the newest while the next iteration needs
        its optimizer moments (it moves into iter_K/); with --keep_iteration_checkpoints all move in."""
        keep = self.config.keep_iteration_checkpoints
        mine = sorted((c for c in self._top_level() if c.iteration <= iteration), key=lambda c: (c.iteration, c.step))
        carry = mine[-1] if mine and self.config.carry_optimizer and not last else None
        for c in mine:
            dest = self.root / f"iter_{c.iteration}" / c.path.name
            if (keep or c is carry) and dest.parent.is_dir() and not dest.exists():
                safe_move(c.path, dest, self.root)
            else:
                safe_rmtree(c.path, self.root)
            faults.point("iteration.retire")
        if last and not keep:
            self._retire_stale(before_iteration=iteration + 1)

    # ---- data --------------------------------------------------------------------------------
    def commit_data(self, directory: Path, iteration: int, extra: dict[str, Any]) -> Manifest:
        """Commit a generated-data directory (rank 0 only; the caller arranges the barrier)."""
        return self._commit(directory, DATA, iteration, 0, extra)

    # ---- housekeeping after the plan ------------------------------------------------------------
    def move_aside(self, paths: list[str]) -> Path | None:
        """Move artifacts into superseded/<time>/ (never delete what the user may still want)."""
        if not paths:
            return None
        dest_root = self.root / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S")
        for rel in paths:
            src = self.root / rel
            if src.exists() or src.is_symlink():
                dest = dest_root / rel
                n = 1
                while dest.exists():
                    dest = dest_root / f"{rel}.{n}"
                    n += 1
                safe_move(src, dest, self.root)
        return dest_root

    def clean_torn(self, inv: Inventory) -> list[str]:
        """Delete directories whose save never completed (rank 0, after the plan is made)."""
        removed = []
        for rel in inv.torn:
            path = self.root / rel
            if path.is_dir() and not path.is_symlink():
                safe_rmtree(path, self.root)
                removed.append(rel)
        return removed

    def finish_interrupted_retirement(self, inv: Inventory, keep_path: str | None) -> list[str]:
        """Stale top-level checkpoints left by a crash between an iteration commit and its clean-up."""
        done = []
        for c in inv.checkpoints:
            if c.status == Status.STALE and "/" not in c.path and c.path != keep_path:
                self._retire(_Ckpt(self.root / c.path, c.iteration, c.step), self.config.keep_iteration_checkpoints)
                done.append(c.path)
        return done


class CommitCallback(TrainerCallback):
    """Commits each trainer checkpoint right after HF Trainer wrote it."""

    def __init__(self, manager: CheckpointManager):
        self.manager = manager

    def on_save(self, args, state, control, **kwargs):
        self.manager.commit_checkpoint(state.global_step, state.best_model_checkpoint)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if distributed.is_main():
            self.manager.wait()  # the last checkpoint is committed before training returns
        return control
