"""Builders of discover()-shaped inventories for the pure plan tests (no torch, no disk)."""

from __future__ import annotations

from itertrain.recovery.discover import DataArtifact, Inventory, IterationModel, Status, TrainerCheckpoint, mark_stale
from itertrain.recovery.flags import RecoveryFlags

OUT = "./experiments/exp"
TORN = "no manifest (the save never completed)"
CORRUPT = "optimizer.pt is 10 bytes, the manifest says 2048"


# --------------------------------------------------------------------------------------------
# helpers


def ckpt(path, iteration, step=None, status=Status.COMMITTED, mtime=None, foreign=False, problem=None):
    """A trainer checkpoint; `step` defaults to the number in the directory name."""
    if step is None:
        step = int(path.rsplit("checkpoint-", 1)[1])
    if problem is None and status == Status.TORN:
        problem = TORN
    if problem is None and status == Status.CORRUPT:
        problem = CORRUPT
    if mtime is None:
        mtime = 1_000_000.0 + iteration * 10_000 + step
    return TrainerCheckpoint(path, step, iteration, status, mtime, problem, None, foreign)


def model(path, iteration, status=Status.COMMITTED, mtime=None, foreign=False, problem=None):
    if problem is None and status == Status.TORN:
        problem = TORN
    if problem is None and status == Status.CORRUPT:
        problem = "model.safetensors is 12 bytes, the manifest says 4096"
    if mtime is None:
        mtime = 1_000_000.0 + iteration * 10_000 + 5_000
    return IterationModel(path, iteration, status, mtime, problem, (), foreign)


def inventory(*artifacts, experiment=True):
    """An Inventory as discover() returns it: discover's own rule marks stale checkpoints, and both
    lists are sorted the same way."""
    models = sorted((a for a in artifacts if isinstance(a, IterationModel)), key=lambda m: (m.iteration, m.path))
    ckpts = mark_stale([a for a in artifacts if isinstance(a, TrainerCheckpoint)], models)
    ckpts.sort(key=lambda c: (c.iteration, c.step, c.path))
    data = tuple(a for a in artifacts if isinstance(a, DataArtifact))
    return Inventory(OUT, experiment, tuple(ckpts), tuple(models), data)


def flags(resume_from="none", resume_from_iteration="none", **kw):
    kw.setdefault("num_iterations", 10)
    return RecoveryFlags(resume_from, resume_from_iteration, **kw)


def rejected_paths(plan):
    return {r.path: r.reason for r in plan.rejected}


