"""Applying a final plan to the output directory (rank 0): the checks that come before any write, the
report, and the housekeeping that comes before training (moving superseded work aside, removing
torn directories, finishing a retirement a crash interrupted, the report file, the launch record).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from itertrain import console, distributed, launcher
from itertrain.args import RESUME_ENV, RunConfig
from itertrain.artifacts.manager import CheckpointManager
from itertrain.errors import RecoveryRefused
from itertrain.experiment import record_launch
from itertrain.fsutil import atomic_write_json
from itertrain.layout import (
    BASE_MODEL_DIR,
    DATA_DIR,
    EXPERIMENT_RECORD,
    RUNS_DIR,
    SUPERSEDED_DIR,
    TRAINER_STATE_NAME,
    checkpoint_name,
    data_name,
    is_top_level,
    iteration_name,
)
from itertrain.recovery import kinds
from itertrain.recovery.discover import Inventory, discover
from itertrain.recovery.flags import flags_of
from itertrain.recovery.plan import Mode, RecoveryPlan, StateScope
from itertrain.recovery.report import render, report_json
from itertrain.recovery.resolve import Resolved, verify_artifact

# Hyperparameters recorded per iteration. Those in RESTORED live in the optimizer's param groups and
# the scheduler's base rates: a full restore brings back the values the iteration started with.
HYPERPARAMETERS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
                   "warmup_steps", "warmup_ratio", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "seed", "optim")
RESTORED = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
# HF Trainer reloads these from the checkpoint's trainer_state.json, whatever the command line says.
STATE_RESTORED = ("save_steps", "logging_steps", "eval_steps")


def _value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def hyperparameters(cfg: RunConfig, restored: dict | None = None) -> dict[str, Any]:
    """The values an iteration actually trains with: the current flags, except those a full restore
    brings back from the checkpoint (RESTORED), which stay as the iteration started."""
    now = {k: _value(getattr(cfg.training, k, None)) for k in HYPERPARAMETERS}
    before = (restored or {}).get("hyperparameters") or {}
    return {**now, **{k: before[k] for k in RESTORED if k in before}}


def resume_changes(plan: RecoveryPlan, root: Path, cfg: RunConfig) -> list[str]:
    """For a mid-iteration full restore: which changed hyperparameters apply now and which only from
    the next iteration (HF restores the optimizer and scheduler as they were)."""
    if plan.state_scope != StateScope.FULL or not plan.state_from:
        return []
    from itertrain.artifacts.manifest import ManifestError, read_manifest

    try:
        manifest = read_manifest(root / plan.state_from)
    except ManifestError:
        manifest = None
    before = dict((manifest.lineage.get("hyperparameters") or {}) if manifest else {})
    try:  # what HF Trainer restores from trainer_state.json itself
        state = json.loads((root / plan.state_from / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        state = {}
    before.setdefault("max_steps", state.get("max_steps"))
    steps_before = {k: state.get(k) for k in STATE_RESTORED}
    now = {**hyperparameters(cfg), **{k: getattr(cfg.training, k, None) for k in STATE_RESTORED}}
    k = plan.iteration
    out = []
    for key, old in {**before, **steps_before}.items():
        new = now.get(key)
        if old is None or new is None or old == new:
            continue
        if key in RESTORED:
            out.append(f"{key} {old} -> {new}: the restored optimizer and scheduler keep {old} until iteration {k} "
                       f"ends; {new} applies from iteration {k + 1}")
        elif key in STATE_RESTORED:
            out.append(f"{key} {old} -> {new}: HF Trainer restores {old} from {plan.state_from}/{TRAINER_STATE_NAME} "
                       f"until iteration {k} ends; {new} applies from iteration {k + 1}")
        elif key == "max_steps":
            out.append(f"max_steps {old} -> {new}: applies now (iteration {k} continues at step {plan.step} and "
                       f"ends at step {new})")
        else:
            out.append(f"{key} {old} -> {new}: applies now, from step {plan.step} of iteration {k} (the run is no "
                       "longer bit-identical to an uninterrupted one)")
    return out


def _save_steps(cfg: RunConfig, from_step: int) -> list[int]:
    t = cfg.training
    every = t.save_steps if t.save_steps and t.save_steps >= 1 else 0
    last = t.max_steps if t.max_steps and t.max_steps > 0 else None
    if not every or last is None:
        return []
    steps = list(range((from_step // int(every) + 1) * int(every), last + 1, int(every)))
    return steps + ([last] if last not in steps else [])


def check_writes(plan: RecoveryPlan, root: Path, cfg: RunConfig, data_iterations: list[int],
                 config_of: Callable[[int], RunConfig] | None = None) -> None:
    """Refuse up front a plan that would have to write, move or delete through a symbolic link (the
    run's own directories, the artifacts it replaces, the names it saves into), or that would find a
    plain file where it saves a directory (found otherwise by the commit, after a whole iteration).
    `data_iterations`: the iterations whose generated data the run writes; `config_of(k)`: the config
    iteration k trains with (an SFT iteration 0's --sft_max_steps), `cfg` for every iteration if not given."""
    if plan.mode == Mode.COMPLETE:
        return
    root = Path(root)
    written = [RUNS_DIR, SUPERSEDED_DIR, *(data_name(k) for k in data_iterations)]
    for k in range(plan.iteration, cfg.loop.num_iterations):
        written.append(iteration_name(k))
        written += [checkpoint_name(s) for s in _save_steps(config_of(k) if config_of else cfg,
                                                           plan.step if k == plan.iteration else 0)]
    moved, listed = list(plan.supersedes), []
    if plan.mode == Mode.FRESH and root.is_dir():
        listed = [n for n in os.listdir(root) if n.startswith(("iter_", "checkpoint-")) or n == BASE_MODEL_DIR]
        moved += overwritten(root, discover(root))  # what --overwrite_output_dir moves aside (evals/, data/, ...)
    linked = sorted({n for n in written + moved + listed if _through_link(root, n)})
    if linked:
        raise RecoveryRefused(
            f"this run would have to write, move or delete {', '.join(linked)} in {root}, and "
            f"{'it is a symbolic link' if len(linked) == 1 else 'those are symbolic links'} (itertrain never "
            "writes through a symlink). Replace the link with a real directory, or resume from an earlier point "
            "(--resume_from / --resume_from_iteration) that does not need it."
        )
    files = sorted({n for n in written if not _below(n, moved) and _file_on_the_way(root, n)})
    if files:
        raise RecoveryRefused(
            f"this run saves directories at {', '.join(files)} in {root}, and a plain file is in the way "
            "(not a directory; no artifact of any kind). Move it elsewhere, then run again."
        )


def _below(rel: str, moved: list[str]) -> bool:
    """Whether `rel` is one of `moved` or inside one (moved aside before the run writes)."""
    return any(rel == m or rel.startswith(m + "/") for m in moved)


def _file_on_the_way(root: Path, rel: str) -> bool:
    """Whether `rel` or a directory above it (below `root`) exists as something other than a directory."""
    path = root
    for part in rel.split("/"):
        path = path / part
        if os.path.lexists(path) and not path.is_dir():
            return True
    return False


def _through_link(root: Path, rel: str) -> bool:
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            return True
    return False


def print_report(resolved: Resolved, cfg: RunConfig, warnings: list[str]) -> None:
    plan = resolved.plan
    print(render(plan.with_(warnings=plan.warnings + tuple(warnings)), cfg.training.output_dir,
                 cfg.model.model_name, resolved.notes), flush=True)


def prepare_output_dir(cfg: RunConfig, resolved: Resolved, record: dict, manager: CheckpointManager,
                       warnings: list[str]) -> dict:
    """Rank 0, once the plan is final: housekeeping, report file, experiment record."""
    plan, inv, root = resolved.plan, resolved.inventory, cfg.output_dir
    notes = list(resolved.notes)
    if plan.mode == Mode.FRESH and inv.has_committed_progress:
        old = overwritten(root, inv)
        dest = manager.move_aside(old)
        notes.append(f"--overwrite_output_dir: moved {len(old)} previous artifact(s) to {dest}")
        record = {}
    for rel in manager.clean_torn([p for p in inv.torn if not p.startswith(tuple(plan.supersedes))]):
        notes.append(f"removed torn {rel} (its save never completed)")
    if plan.supersedes:
        dest = manager.move_aside(list(plan.supersedes))
        notes.append(f"moved {', '.join(plan.supersedes)} to {dest} (this run replaces them)")
    notes += _finish_retirement(resolved, manager, root)
    notes += _requeue_warning(cfg, plan.mode == Mode.FRESH and inv.has_committed_progress or bool(plan.supersedes))
    runs = root / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = console.write_to(runs / f"train-{stamp}.log")
    if log is not None:
        notes.append(f"console log: {log}")
    report = report_json(plan, inv, flags_of(cfg), world_size=distributed.world_size(), notes=notes + warnings)
    atomic_write_json(runs / f"recovery-{stamp}-{os.getpid()}.json", report)
    for n in notes[len(resolved.notes):]:
        print(f"   {n}", flush=True)
    summary = {"world_size": distributed.world_size(), "mode": plan.mode.value, "iteration": plan.iteration,
               "step": plan.step, "weights_from": plan.weights_from, "state_from": plan.state_from,
               **launcher.launch_summary()}
    return record_launch(root, record, cfg, summary)


def overwritten(root: Path, inv: Inventory) -> list[str]:
    """What `--overwrite_output_dir` moves aside before a fresh run (nothing without committed progress):
    every artifact's top-level directory, data/, base_model/ and the record. `check_writes` refuses the
    launch up front when one is a symlink, rather than failing half-way through the moves."""
    if not inv.has_committed_progress:
        return []
    ours = {DATA_DIR, BASE_MODEL_DIR, EXPERIMENT_RECORD, *artifact_dirs(inv)}
    return [p.name for p in sorted(root.iterdir()) if p.name.startswith(("iter_", "checkpoint-")) or p.name in ours]


def artifact_dirs(inv: Inventory) -> set[str]:
    """The top-level directories holding the artifacts of every registered kind (a kind beyond the
    built-in ones keeps its own, e.g. `evals/`): what `--overwrite_output_dir` moves aside with them."""
    return {a.path.split("/", 1)[0] for kind in kinds.registered() for a in inv.group(kind.group)}


def _requeue_warning(cfg: RunConfig, moved_aside: bool) -> list[str]:
    """A requeue script (ITERTRAIN_RESUME=auto) whose command also carries a flag that supersedes work
    would move the new progress aside on every requeue: said in the report, never silently."""
    if not moved_aside or os.environ.get(RESUME_ENV, "").strip().lower() != "auto":
        return []
    f = flags_of(cfg)
    flags = "--overwrite_output_dir" if f.overwrite_output_dir else \
        f"--resume_from {f.resume_from} --resume_from_iteration {f.resume_from_iteration}"
    return [f"⚠️  {RESUME_ENV}=auto is set, yet this command's {flags} moved committed work to superseded/: "
            "a requeue that repeats this command does so again every time; requeue without those flags"]


def _finish_retirement(resolved: Resolved, manager: CheckpointManager, root: Path) -> list[str]:
    """Stale top-level checkpoints left by a crash between an iteration commit and its clean-up are
    retired, but only those whose iteration model verifies: otherwise they may rebuild it."""
    plan, inv = resolved.plan, resolved.inventory
    stale = [c for c in inv.checkpoints if is_top_level(c.path) and c.iteration < plan.iteration and not c.symlink
             and c.path != plan.state_from and c.status.usable and not c.foreign]
    if not stale:
        return []
    rejected = {r.path for r in plan.rejected}
    backed, notes = set(), []
    for k in sorted({c.iteration for c in stale}):
        model = next((m for m in inv.iteration_models if m.iteration == k and not m.foreign), None)
        if model is None or model.path in rejected or model.symlink:
            continue
        why = None if model.path in resolved.verified else verify_artifact(root, inv, model.path)
        if why is None:
            backed.add(k)
        else:
            notes.append(f"kept the checkpoints of iteration {k}: {model.path} does not verify ({why})")
    protect = frozenset({plan.state_from} if plan.state_from else set())
    for rel in manager.retire_interrupted(plan.iteration, backed, protect):
        notes.append(f"retired stale {rel} (left by an interrupted iteration commit)")
    return notes
