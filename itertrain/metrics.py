"""Metrics outputs under runs/: metrics.jsonl (one line per committed iteration) and TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from itertrain.fsutil import atomic_write_bytes
from itertrain.artifacts.manifest import ManifestError, read_manifest
from itertrain.layout import ITERATION_RE


def committed_metrics(root: Path) -> list[dict[str, Any]]:
    """Per-iteration metrics, read from the committed iteration models' manifests."""
    rows = []
    if not Path(root).is_dir():
        return rows
    for name in os.listdir(root):
        if ITERATION_RE.match(name):
            try:
                m = read_manifest(root / name)
            except ManifestError:
                continue
            if m is not None and "metrics" in m.extra:
                rows.append(m.extra["metrics"])
    return sorted(rows, key=lambda r: r.get("iteration", 0))


def _writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: events are optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLog:
    """Rank 0: keeps runs/metrics.jsonl equal to what the committed iterations recorded.

    Rebuilding from the manifests (instead of appending) makes it idempotent: a crash between an
    iteration's commit and this write can neither lose nor duplicate a line.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "runs" / "metrics.jsonl"

    def rebuild(self) -> list[dict[str, Any]]:
        rows = committed_metrics(self.root)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        writer = _writer(self.root / "runs" / "tensorboard" / "iterations")
        if writer is not None and rows:
            last = rows[-1]
            for key, value in last.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    writer.add_scalar(f"iteration/{key}", value, last["iteration"])
            writer.close()
        return rows

    def describe(self, iteration: int) -> str:
        for row in committed_metrics(self.root):
            if row.get("iteration") == iteration:
                return f"📈 iter_{iteration}: " + describe_row(row)
        return f"📈 iter_{iteration}: no metrics recorded"


def describe_row(row: dict[str, Any]) -> str:
    """One iteration's metrics as `name=value` pairs; a count next to a rate is shown as a fraction with its
    percentage (passed=7/280 (2.5 %)), so a count is never read as a rate or the other way round."""
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k not in ("iteration", "prompts", "prompts_solved", "heldout_prompts")}
    samples, rate = row.get("samples"), row.get("acceptance_rate")
    if isinstance(samples, int) and isinstance(rate, (int, float)):
        # acceptance_rate counts every passing sample; `accepted` is what was kept after deduplication
        shown["acceptance_rate"] = f"{round(rate * samples)}/{samples} passed ({rate:.1%})".replace("%", " %")
        if "accepted" in shown:
            shown["accepted"] = f"{shown['accepted']} distinct kept"
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def tensorboard_dir(root: Path, iteration: int) -> Path:
    """One TensorBoard tree per experiment: runs/tensorboard/iter_K (and iterations/ for per-iteration figures)."""
    return Path(root) / "runs" / "tensorboard" / f"iter_{iteration}"


class TensorBoardCallback(TrainerCallback):
    """Rank 0: HF Trainer's step logs as TensorBoard scalars, one run per iteration, tagged as HF's own
    TensorBoard integration tags them (train/..., eval/...). Used when --report_to has no tensorboard;
    with it, HF's integration writes into the same directory instead."""

    def __init__(self, root: Path, iteration: int):
        self.log_dir = tensorboard_dir(root, iteration)
        self.writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        if self.writer is None:
            self.writer = _writer(self.log_dir)
            if self.writer is None:
                return control
        from transformers.integrations.integration_utils import rewrite_logs

        for key, value in rewrite_logs(logs).items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, state.global_step)
        self.writer.flush()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
        return control


class IterationLossCallback(TrainerCallback):
    """Makes the `train_loss` HF logs at the end of train() mean the same as itertrain's: the mean of
    the iteration's logged losses. HF's covers only the steps of this train() call, so after a resume
    the two disagreed; HF's figure stays, as `train_loss_this_launch`. Must run before the printers."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_loss" in logs:
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            if getattr(self, "start_step", 0) > 0:
                logs["train_loss_this_launch"] = logs["train_loss"]
            if losses:
                logs["train_loss"] = sum(losses) / len(losses)
        return control


def finished_state(checkpoint: str | None, max_steps: int):
    """The TrainerState of a checkpoint taken at (or past) the iteration's final step under the
    current --max_steps, else None. (HF Trainer would run one extra step when resumed at max_steps.)"""
    if checkpoint is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    limit = max_steps if max_steps and max_steps > 0 else state.max_steps
    return state if limit and state.global_step >= limit else None


def iteration_train_loss(state, fallback: float) -> float:
    """Mean of the logged training losses of the whole iteration. HF's own `training_loss` covers only
    the steps of the last train() call, so after a resume it would differ from an uninterrupted run."""
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    return sum(losses) / len(losses) if losses else fallback
