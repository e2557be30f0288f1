"""Trackers that understand iterations: one tracker run per experiment, one step axis across iterations.

Hugging Face's own integration callbacks (W&B, MLflow, TensorBoard, trackio) still do the logging; itertrain
only (1) opens the experiment's W&B / MLflow run itself, with the id kept in `itertrain.json`, so every
iteration and every relaunch continues that one run; (2) shows those callbacks the experiment's global step
(iteration K's step = the steps of iterations 0..K-1 + its own) with `iteration` added to each log; and
(3) logs each iteration's committed metrics (the metrics.jsonl row) as `committed/<name>`. Rank 0 only.
"""

from __future__ import annotations

import copy
import os
import re
import uuid
from pathlib import Path
from typing import Any

from itertrain.errors import TrackerUnavailable, UsageError
from itertrain.experiment import load_record
from itertrain.fsutil import atomic_write_json
from itertrain.layout import EXPERIMENT_RECORD
from itertrain.metrics import committed_metrics

PREFIX = "committed/"  # a committed iteration's metrics: committed/<name>, at the step where it ended
RECORD_KEY = "trackers"  # itertrain.json: {"wandb": run id, "mlflow": run id}
_STEP_KEY = "train/global_step"  # the x-axis HF's W&B integration defines
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")  # what both W&B and MLflow accept as a run id


def reported(args: Any) -> set[str]:
    """The trackers --report_to names ("all": every integration installed, as HF reads it)."""
    names = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    names = {str(n) for n in names if n}
    if "all" in names:
        from transformers.integrations.integration_utils import get_available_reporting_integrations

        names = set(get_available_reporting_integrations())
    return names - {"none"}


def step_offset(root: Path, iteration: int) -> int:
    """The experiment's global step at which `iteration` starts: the committed steps of the iterations before it."""
    return sum(int(row.get("steps") or 0) for row in committed_metrics(root) if row.get("iteration", 0) < iteration)


def open_runs(root: Path, args: Any) -> list[str]:
    """Rank 0, before the first iteration of a launch: open (or continue) the experiment's W&B and MLflow
    runs, keeping their ids in itertrain.json. Returns report lines."""
    names = reported(args)
    record = load_record(root)
    known = record.get(RECORD_KEY)
    ids = {k: v for k, v in known.items() if isinstance(v, str)} if isinstance(known, dict) else {}
    lines: list[str] = []
    for name, opener in (("wandb", _open_wandb), ("mlflow", _open_mlflow)):
        if name in names:
            try:
                lines.append(opener(root, args, ids))
            except Exception as e:  # noqa: BLE001 - any tracker failure: one line, exit 1, before training
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise TrackerUnavailable(
                    f"--report_to {name}: the tracker could not open its run ({first[:300]}). Nothing was "
                    "trained; torchrun retries when --max-restarts allows (an outage may be over by then). Check "
                    f"that its server answers and its settings (environment variables), or drop {name} from "
                    "--report_to, and relaunch with --resume_from auto --resume_from_iteration auto") from e
    if record and ids != (record.get(RECORD_KEY) or {}):
        atomic_write_json(Path(root) / EXPERIMENT_RECORD, {**record, RECORD_KEY: ids})
    return lines


def check_recorded_ids(root: Path, record: dict[str, Any], args: Any) -> None:
    """Before anything is written: the run ids itertrain.json keeps for the trackers of --report_to are
    ids a tracker accepts (a hand-edited record otherwise fails only once the launch has begun)."""
    known = record.get(RECORD_KEY) if isinstance(record, dict) else None
    if not isinstance(known, dict):
        return
    for name in sorted(reported(args) & {"wandb", "mlflow"}):
        value = known.get(name)
        if value is not None and not (isinstance(value, str) and _RUN_ID.fullmatch(value)):
            raise UsageError(
                f"{Path(root) / EXPERIMENT_RECORD} keeps {value!r} as the {name} run id (\"{RECORD_KEY}\": "
                f"{{\"{name}\": ...}}), which is not a run id (letters, digits, '_' and '-'). Nothing was written; "
                f"put the run's id there, or delete the \"{name}\" entry to start a new {name} run, and relaunch")


def _open_wandb(root: Path, args: Any, ids: dict[str, str]) -> str:
    import wandb

    known = ids.get("wandb")
    ids["wandb"] = known or uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    if wandb.run is None:
        # The id is recorded before the run exists: a launch killed in between continues the same id.
        wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), id=ids["wandb"], resume="allow",
                   name=args.run_name if args.run_name != args.output_dir else None,
                   dir=os.environ.get("WANDB_DIR") or str(Path(root) / "runs"))
    return f"📊 W&B run {ids['wandb']}" + (" (continued)" if known else " (new; id kept in itertrain.json)")


def _open_mlflow(root: Path, args: Any, ids: dict[str, str]) -> str:
    import mlflow

    known = ids.get("mlflow")
    if mlflow.active_run() is None:
        if os.getenv("MLFLOW_EXPERIMENT_NAME") and not known:
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        try:
            run = mlflow.start_run(run_id=known, run_name=None if known else args.run_name)
        except mlflow.exceptions.MlflowException as e:
            if known is None:
                raise
            # The recorded run is not in this tracking store (another MLFLOW_TRACKING_URI): a new run.
            run = mlflow.start_run(run_name=args.run_name)
            ids["mlflow"] = run.info.run_id
            return f"📊 MLflow run {known} not found ({str(e).splitlines()[0]}); new run {ids['mlflow']}"
        ids["mlflow"] = run.info.run_id
    return f"📊 MLflow run {ids['mlflow']}" + (" (continued)" if known else " (new; id kept in itertrain.json)")


def close_runs() -> None:
    """Rank 0, as a launch ends (also on preemption, which skips the interpreter's exit hooks)."""
    import sys

    try:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
        if "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run()
    except Exception as e:  # noqa: BLE001 - never hides how the launch ended (an error being raised, say)
        print(f"   ⚠️  a tracker did not close its run ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
              flush=True)


class IterationSteps:
    """Mixin in front of a logging callback: it sees the experiment's global step, and `iteration` in each log."""

    offset = 0
    iteration = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        shifted = copy.copy(state)
        shifted.global_step = state.global_step + self.offset
        return super().on_log(args, shifted, control, logs={**(logs or {}), "iteration": self.iteration}, **kwargs)


class _NewParamsOnly:
    """The mlflow module as HF's MLflowCallback uses it, except that log_params logs only parameters the run
    does not have yet: MLflow refuses to change a parameter, and iterations differ (the seed, for one)."""

    def __init__(self, mlflow):
        self._mlflow = mlflow

    def __getattr__(self, name):
        return getattr(self._mlflow, name)

    def log_params(self, params, **kwargs):
        have = self._mlflow.get_run(self._mlflow.active_run().info.run_id).data.params
        new = {k: v for k, v in params.items() if k not in have}
        if new:
            self._mlflow.log_params(new, **kwargs)


_SHIFTED: dict[type, type] = {}


def _logging_callbacks() -> tuple[type, ...]:
    from transformers.integrations import integration_utils as hf

    from itertrain.metrics import TensorBoardCallback

    names = ("WandbCallback", "MLFlowCallback", "MLflowCallback", "TensorBoardCallback", "TrackioCallback")
    return (TensorBoardCallback, *(getattr(hf, n) for n in names if hasattr(hf, n)))


def attach(trainer: Any, root: Path, iteration: int) -> Any:
    """Put `IterationSteps` in front of the trainer's logging callbacks (rank 0; a no-op elsewhere).
    The instances are kept (their class is swapped), so what their constructors took stays."""
    if not trainer.is_world_process_zero():
        return trainer
    offset = step_offset(root, iteration)
    for cb in trainer.callback_handler.callbacks:
        base = type(cb)
        if not isinstance(cb, _logging_callbacks()) or isinstance(cb, IterationSteps):
            continue
        if base not in _SHIFTED:
            _SHIFTED[base] = type(base.__name__, (IterationSteps, base), {"__doc__": base.__doc__})
        cb.__class__ = _SHIFTED[base]
        cb.offset, cb.iteration = offset, iteration
        if hasattr(cb, "_ml_flow") and cb._ml_flow is not None and not isinstance(cb._ml_flow, _NewParamsOnly):
            cb._ml_flow = _NewParamsOnly(cb._ml_flow)
    return trainer


def log_iteration(root: Path, args: Any, iteration: int) -> None:
    """Rank 0, after iteration K committed: its metrics.jsonl row to the open runs, as committed/<name>,
    at the step where the iteration ended."""
    row = next((r for r in committed_metrics(root) if r.get("iteration") == iteration), None)
    if row is None:
        return
    step = step_offset(root, iteration) + int(row.get("steps") or 0)
    # Not "iteration/...": MLflow's file store keeps a metric per file, and "iteration" is one already.
    values = {f"{PREFIX}{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names = reported(args)
    import sys

    try:
        if "wandb" in names and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].log({**values, _STEP_KEY: step})
        if "mlflow" in names and "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].log_metrics(values, step=step)
    except Exception as e:  # noqa: BLE001 - a tracker's failure never stops training; the metrics are committed
        print(f"   ⚠️  iteration {iteration}'s metrics did not reach the tracker ({str(e).splitlines()[0]}); "
              "they are in runs/metrics.jsonl", flush=True)
