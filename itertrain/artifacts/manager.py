"""CheckpointManager: the one owner of writes, moves and deletes of artifact directories.

The train loop and HF Trainer (through `CommitCallback` and `RecoveryHooks`) call it; it composes
the commit worker (manifests), the iteration-model writer and the pure retention plan. Rank 0 alone
writes manifests, moves and deletes; every commit sits behind a barrier that waits for all ranks'
files. Strategies never see the manager: they get `commit_data` and `move_aside`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itertrain import distributed, faults
from itertrain.artifacts.async_save import AsyncSaver
from itertrain.artifacts.commit import CommitWorker
from itertrain.artifacts.kind import DATA, ITERATION_MODEL, TRAINER_CHECKPOINT
from itertrain.artifacts.manifest import Manifest, ManifestError, read_header, read_manifest
from itertrain.artifacts.retention import Action, Event, ListedCheckpoint, Op, RetentionPolicy, plan_retention
from itertrain.artifacts.writer import write_iteration_model
from itertrain.errors import ArtifactWriteError
from itertrain.fsutil import describe_write_error, safe_move, safe_rmtree
from itertrain.layout import (
    MANIFEST_NAME,
    SUPERSEDED_DIR,
    Kind,
    checkpoint_name,
    is_top_level,
    iteration_name,
    scan,
)

KEPT_CHECKPOINTS = "kept_checkpoints"  # iteration manifest extra: its checkpoints were kept by the user


@dataclass
class CheckpointConfig:
    output_dir: Path
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    fsync: bool = True
    async_commit: bool = True  # hash, fsync and write checkpoint manifests on a thread while training goes on
    async_save: bool = False  # copy at the save step; HF writes from the copy on a thread, then the commit
    world_size: int = 1
    io_timeout_s: float = 1800.0  # --dist_io_timeout_s: how long rank 0's writer waits for the other ranks' files


def kept_by_user(model_dir: Path, inside: int) -> bool:
    """Whether the `inside` committed checkpoints kept inside iteration model `model_dir` were kept by the
    user (--keep_iteration_checkpoints), which exempts them from retention. The one rule: the model's
    manifest says; an older manifest does not, and more than one checkpoint inside can only have been
    kept; an unreadable manifest counts as kept (never delete what may be the user's)."""
    try:
        manifest = read_manifest(model_dir)
    except ManifestError:
        return True
    if manifest is None:
        return inside > 1
    return bool(manifest.extra.get(KEPT_CHECKPOINTS, inside > 1))


def committed_listing(root: Path) -> tuple[list[ListedCheckpoint], set[int]]:
    """(committed trainer checkpoints, iterations with a committed model) from manifest headers."""
    checkpoints: list[ListedCheckpoint] = []
    models: set[int] = set()
    inside: dict[int, int] = {}
    kept: dict[int, bool] = {}
    entries = scan(root)
    for e in entries:
        try:
            header = read_header(str(Path(root) / e.rel))
        except ManifestError:
            continue
        if header is None or header.kind != e.kind.value or e.symlink:
            continue
        if e.kind == Kind.ITERATION_MODEL and e.rel == iteration_name(e.number):
            models.add(e.number)
        elif e.kind == Kind.TRAINER_CHECKPOINT:
            checkpoints.append(ListedCheckpoint(e.rel, header.iteration, header.step))
            if not is_top_level(e.rel):
                inside[header.iteration] = inside.get(header.iteration, 0) + 1
    for k, n in inside.items():
        kept[k] = kept_by_user(Path(root) / iteration_name(k), n)
    checkpoints = [ListedCheckpoint(c.path, c.iteration, c.step, kept_by_user=not is_top_level(c.path)
                                    and kept.get(c.iteration, True)) for c in checkpoints]
    return checkpoints, models


class CheckpointManager:
    """Owns every write, move and delete of artifact directories in one experiment."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.root = Path(config.output_dir)
        self.iteration = 0
        self.lineage: dict[str, Any] = {}
        self.worker = CommitWorker(fsync=config.fsync, world_size=config.world_size, background=config.async_commit)
        self.saver = AsyncSaver(timeout=config.io_timeout_s) if config.async_save else None

    def start_iteration(self, iteration: int, lineage: dict[str, Any]) -> None:
        """The iteration whose checkpoints the next commits describe (main thread)."""
        self.iteration = iteration
        self.lineage = dict(lineage)

    def wait(self) -> None:
        """Finish what runs in the background: this rank's checkpoint write (`--async_save`, every
        rank) and the commit that follows it (rank 0); raise its error, if any. Any rank may call it."""
        if self.saver is not None:
            self.saver.wait()
        self.worker.wait()

    def abandon(self) -> None:
        """Stop this rank's background checkpoint write (`--async_save`) without committing it: the
        checkpoint stays torn and the next launch resumes from the previous one. A manifest already
        being written finishes (it is atomic). For a shutdown that cannot wait (SIGTERM's deadline, a
        second Ctrl-C); errors are dropped. Any rank may call it."""
        if self.saver is not None:
            self.saver.abandon()
        self.worker.close()

    def close(self) -> None:
        """Every rank, on the way out: let the background write and commit finish (a snapshot is a
        consistent checkpoint, so it is committed) before the lock is released; errors are dropped
        (the run is already ending). Interrupted (a second Ctrl-C), it abandons the write instead."""
        saver = self.saver
        try:
            if saver is not None and saver.busy:
                if distributed.is_main():
                    print(f"itertrain: finishing the background write of {checkpoint_name(saver.last_step or 0)} "
                          "(Ctrl-C again abandons it: the previous checkpoint is kept)", file=sys.stderr, flush=True)
                saver.wait()
        except KeyboardInterrupt:
            self.abandon()
            if saver is not None and distributed.is_main():
                print(f"itertrain: abandoned the background write of {checkpoint_name(saver.last_step or 0)}; it "
                      "stays uncommitted", file=sys.stderr, flush=True)
        except BaseException:  # noqa: BLE001 - already failing; the first error is the one reported
            pass
        self.worker.close()

    # ---- trainer checkpoints ---------------------------------------------------------------------
    def before_save(self, step: int) -> None:
        """Make sure `checkpoint-step` is free before HF writes into it (all ranks call this)."""
        if distributed.is_main():
            self.wait()  # commits land in order; rotation never races a save
            target = self.root / checkpoint_name(step)
            if target.exists() or target.is_symlink():
                self._free(target)
        distributed.barrier()

    def _free(self, target: Path) -> None:
        """An occupied name: a stale checkpoint of an older iteration moves into its iter_K/; anything
        else (adopted from another tool, or damaged) moves to superseded/. Never deleted."""
        try:
            manifest = read_manifest(target) if not target.is_symlink() else None
        except ManifestError:
            manifest = None
        if manifest is not None and manifest.iteration < self.iteration:
            dest = self.root / iteration_name(manifest.iteration) / target.name
            if dest.parent.is_dir() and not dest.exists():
                safe_move(target, dest, self.root)
                return
        self.move_aside([target.name])

    def commit_checkpoint(self, step: int, best: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """After HF saved `checkpoint-step` on every rank: manifest (rank 0), then retention. With
        async_commit the manifest work runs on a thread; the checkpoint counts as committed only when
        its manifest lands, so a crash before that leaves it torn and the previous one is used.
        `extra`: recorded in the manifest (e.g. that this is a preemption checkpoint)."""
        distributed.barrier()  # every rank's files are on disk
        if distributed.is_main():
            self._commit_checkpoint(step, best, self.iteration, dict(self.lineage), extra, background=True)
        if not self.config.async_commit:
            # Rank 0 hashed every file inline: the others wait here, on itertrain's long-timeout group,
            # rather than in training's next collective (whose timeout is meant for training steps).
            distributed.barrier()

    def checkpoint_committer(self, step: int, extra: dict[str, Any] | None = None):
        """`--async_save`: what rank 0's writer calls once every rank's files of `checkpoint-step` are
        written: hash, fsync and commit the manifest, then retention. The iteration and lineage are
        taken now (training thread), not when the writer gets there."""
        iteration, lineage = self.iteration, dict(self.lineage)

        def commit(best: str | None) -> None:
            self._commit_checkpoint(step, best, iteration, lineage, extra)

        return commit

    def _commit_checkpoint(self, step: int, best: str | None, iteration: int, lineage: dict[str, Any],
                           extra: dict[str, Any] | None = None, *, background: bool = False) -> None:
        """Commit `checkpoint-step` through its kind (on the worker's thread when `background`), then retention."""
        directory = self.root / checkpoint_name(step)
        protect = frozenset({directory.name} | ({Path(best).name} if best else set()))

        def retain(_: Manifest) -> None:
            self._apply_retention(Event.CHECKPOINT_COMMITTED, iteration, protect)

        commit = TRAINER_CHECKPOINT.submit if background else TRAINER_CHECKPOINT.commit
        commit(directory, worker=self.worker, iteration=iteration, step=step, lineage=lineage, extra=extra,
               before=lambda: faults.point("checkpoint.commit"), after=retain)

    # ---- iteration models --------------------------------------------------------------------------
    def commit_iteration_model(self, model, tokenizer, iteration: int, step: int, *, last: bool,
                               max_shard_size: str, metrics: dict[str, Any], replaces: frozenset[str] = frozenset(),
                               extra: dict[str, Any] | None = None, state_dict: dict | None = None) -> None:
        """Write iter_K (rank 0), commit it, then retire iteration K's checkpoints. All ranks call.

        `replaces`: an existing iter_K this launch rejected (corrupt): it moves to superseded/ first.
        Any other existing iter_K is committed work, and is never overwritten. `state_dict`: the whole
        weights when the model is sharded across ranks (gathered beforehand by every rank)."""
        def write() -> None:
            self.wait()
            directory = self.root / iteration_name(iteration)
            keep = self.config.retention.keep_iteration_checkpoints
            rescued: list[str] = []
            if directory.name in replaces and (directory.exists() or directory.is_symlink()):
                rescued, kept = self._rescue_checkpoints(directory)
                keep = keep or kept
                self.move_aside([directory.name])
            if (directory / MANIFEST_NAME).exists():
                raise ArtifactWriteError(f"{directory} is already committed; refusing to overwrite it")
            write_iteration_model(model, tokenizer, directory, max_shard_size=max_shard_size, state_dict=state_dict)
            ITERATION_MODEL.commit(directory, worker=self.worker, iteration=iteration, step=step, lineage=self.lineage,
                                   extra={"metrics": metrics, KEPT_CHECKPOINTS: keep, **(extra or {})})
            for name in rescued:  # back where they were: the carry for iteration K+1, or the user's kept ones
                safe_move(self.root / name, directory / name, self.root)
            faults.point("iteration.after_manifest")
            self._apply_retention(Event.ITERATION_COMMITTED, iteration, frozenset(), last=last,
                                  fault="iteration.retire")

        distributed.run_on_main(write)

    def _rescue_checkpoints(self, directory: Path) -> tuple[list[str], bool]:
        """Committed checkpoints kept inside a rejected iteration model are intact work (each has its own
        manifest): before the model moves aside they move to the top level, where a crash before the
        replacement commits still finds them (they can rebuild it), and they return into the new model
        after. Returns (their names, whether the user kept them with --keep_iteration_checkpoints)."""
        names = [e.rel.split("/", 1)[1] for e in scan(self.root)
                 if e.kind == Kind.TRAINER_CHECKPOINT and e.rel.startswith(directory.name + "/") and not e.symlink]
        committed = []
        for name in names:
            try:
                header = read_header(str(directory / name))
            except ManifestError:
                continue
            if header is not None and header.kind == Kind.TRAINER_CHECKPOINT.value:
                committed.append(name)
        kept = kept_by_user(directory, len(committed))  # read before anything moves
        rescued = []
        for name in committed:
            if (self.root / name).exists():
                continue  # its name is taken: it moves aside with the model (as torn or damaged ones do)
            safe_move(directory / name, self.root / name, self.root)
            rescued.append(name)
        return rescued, kept

    # ---- data ----------------------------------------------------------------------------------------
    def commit_data(self, directory: Path, iteration: int, lineage: dict[str, Any],
                    extra: dict[str, Any]) -> Manifest:
        """Commit a generated-data directory (rank 0 only; the caller arranges the barrier)."""
        return DATA.commit(directory, worker=self.worker, iteration=iteration, lineage=lineage, extra=extra)

    # ---- retention and housekeeping ----------------------------------------------------------------------
    def _apply_retention(self, event: Event, iteration: int, protect: frozenset[str], *, last: bool = False,
                         backed: set[int] | None = None, fault: str | None = None) -> list[Action]:
        listing, models = committed_listing(self.root)
        actions = plan_retention(listing, event=event, iteration=iteration, policy=self.config.retention,
                                 backed=models if backed is None else backed, models=models, protect=protect,
                                 last=last)
        for a in actions:
            self.apply(a)
            if fault:
                faults.point(fault)
        return actions

    def apply(self, action: Action) -> None:
        src = self.root / action.path
        try:
            if action.op == Op.MOVE:
                assert action.dest is not None
                safe_move(src, self.root / action.dest, self.root)
            else:
                safe_rmtree(src, self.root)
        except OSError as e:
            raise ArtifactWriteError(describe_write_error(e, src)) from e

    def retire_interrupted(self, iteration: int, backed: set[int], protect: frozenset[str]) -> list[str]:
        """Stale top-level checkpoints left by a crash between an iteration commit and its clean-up, of
        iterations whose model is verified usable (`backed`). Rank 0, after the plan is final."""
        done = self._apply_retention(Event.PLAN_MADE, iteration, protect, backed=backed)
        return [a.path for a in done]

    def move_aside(self, paths: list[str]) -> Path | None:
        """Move artifacts into superseded/<time>/ (never delete what the user may still want)."""
        present = [rel for rel in paths if (self.root / rel).exists() or (self.root / rel).is_symlink()]
        if not present:
            return None
        dest_root = self.root / SUPERSEDED_DIR / time.strftime("%Y%m%d-%H%M%S")
        for rel in present:
            dest = dest_root / rel
            n = 1
            while dest.exists():
                dest = dest_root / f"{rel}.{n}"
                n += 1
            safe_move(self.root / rel, dest, self.root)
        return dest_root

    def clean_torn(self, torn: list[str]) -> list[str]:
        """Delete directories whose save never completed (rank 0, after the plan is made)."""
        removed = []
        for rel in torn:
            path = self.root / rel
            if path.is_dir() and not path.is_symlink() and not os.path.exists(path / MANIFEST_NAME):
                safe_rmtree(path, self.root)
                removed.append(rel)
        return removed
