"""The iteration loop (SPEC §4): recover, then for each iteration generate -> train -> evaluate -> commit.

Read top to bottom: `run` is the whole experiment; `run_iteration` is one iteration's stages.
Moving from iteration K to K+1 goes through the same recovery path a relaunch takes (discover,
plan with auto/auto, verify, load), so an uninterrupted run and a resumed one do the same thing.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from itertrain import distributed, faults
from itertrain.args import RunConfig
from itertrain.checkpointing import CheckpointConfig, CheckpointManager, CommitCallback
from itertrain.data import PadCollator, build_dataset
from itertrain.errors import ArtifactWriteError, TrainingFailed, UsageError
from itertrain.experiment import check_resume, load_record, record_launch
from itertrain.fsutil import atomic_write_json, describe_write_error
from itertrain.lock import RunLock
from itertrain.metrics import MetricsLog, TensorBoardCallback
from itertrain.recovery.plan import AUTO, BASE, Mode, RecoveryFlags, StateScope
from itertrain.recovery.report import render, report_json
from itertrain.recovery.resolve import LoadOptions, Resolved, resolve
from itertrain.recovery.restore import OptimizerMomentsCallback, manifest_id
from itertrain.strategies import LoopContext, make_strategy
from itertrain.trainer import IterationTrainer


def say(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


def run(cfg: RunConfig) -> int:
    """The whole experiment. Returns the exit code (errors are raised as ItertrainError)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars; the training bar stays
    distributed.init()
    root = cfg.output_dir
    tokenizer = _load_tokenizer(cfg)  # a bad tokenizer is a usage error: found before anything is written
    lock = RunLock(root)
    distributed.run_on_main(lock.acquire)
    wrote = False
    try:
        record = distributed.run_on_main(load_record, root)
        opts = LoadOptions(cfg.model.model_name, cfg.model.tokenizer_name, cfg.model.model_dtype,
                           cfg.model.trust_remote_code)
        config_warnings: list[str] = []

        def check_config(plan) -> None:
            if plan.mode != Mode.FRESH:
                config_warnings[:] = distributed.run_on_main(check_resume, record, cfg)

        resolved = resolve(root, cfg.recovery_flags(), record, opts, before_load=check_config)
        plan = resolved.plan
        if distributed.is_main():
            print(render(replace(plan, warnings=plan.warnings + tuple(config_warnings)), cfg.training.output_dir,
                         cfg.model.model_name, resolved.notes), flush=True)
        if plan.mode == Mode.COMPLETE:
            say(f"✅ {root}: all {cfg.loop.num_iterations} iterations are committed; nothing to do.")
            return 0
        wrote = True
        manager = CheckpointManager(CheckpointConfig(
            output_dir=root,
            save_total_limit=cfg.training.save_total_limit,
            keep_iteration_checkpoints=cfg.loop.keep_iteration_checkpoints,
            carry_optimizer=cfg.loop.iteration_init == "previous",
            fsync=cfg.loop.fsync,
            async_commit=cfg.loop.async_commit,
            world_size=distributed.world_size(),
        ))
        record = distributed.run_on_main(
            _after_plan, cfg, resolved, record, manager, config_warnings
        )
        ctx = LoopContext(cfg, root, tokenizer, manager)
        strategy = make_strategy(ctx)
        metrics = MetricsLog(root) if distributed.is_main() else None
        auto = RecoveryFlags(AUTO, AUTO, False, cfg.loop.num_iterations, cfg.loop.iteration_init)
        while True:
            run_iteration(ctx, strategy, resolved, record, metrics)
            if resolved.plan.iteration + 1 >= cfg.loop.num_iterations:
                break
            resolved = resolve(root, auto, record, opts)
            say(f"➡️  iteration {resolved.plan.iteration}: weights from {resolved.plan.weights_from}, "
                f"training state: {resolved.plan.state_scope.value}"
                + (f" from {resolved.plan.state_from}" if resolved.plan.state_from else ""))
        say(f"✅ experiment complete: {cfg.loop.num_iterations} iteration(s) committed in {root}")
        return 0
    finally:
        if distributed.is_main():
            lock.release(restore=not wrote)


def _after_plan(cfg: RunConfig, resolved: Resolved, record: dict, manager: CheckpointManager,
                config_warnings: list[str]) -> dict:
    """Rank 0, once the plan is final: housekeeping, report file, experiment record."""
    plan, inv, root = resolved.plan, resolved.inventory, cfg.output_dir
    notes = list(resolved.notes)
    if plan.mode == Mode.FRESH and inv.has_committed_progress:
        old = [p.name for p in sorted(root.iterdir()) if p.name.startswith(("iter_", "checkpoint-"))
               or p.name in ("data", "base_model", "itertrain.json")]
        dest = manager.move_aside(old)
        notes.append(f"--overwrite_output_dir: moved {len(old)} previous artifact(s) to {dest}")
        record = {}
    for rel in manager.clean_torn(inv):
        notes.append(f"removed torn {rel} (its save never completed)")
    if plan.supersedes:
        dest = manager.move_aside(list(plan.supersedes))
        notes.append(f"moved {', '.join(plan.supersedes)} to {dest} (this run replaces them)")
    for rel in manager.finish_interrupted_retirement(inv, plan.state_from):
        notes.append(f"retired stale {rel} (left by an interrupted iteration commit)")
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = report_json(plan, inv, cfg.recovery_flags(), world_size=distributed.world_size(),
                         notes=notes + config_warnings)
    atomic_write_json(runs / f"recovery-{stamp}-{os.getpid()}.json", report)
    for n in notes:
        print(f"   {n}", flush=True)
    summary = {"world_size": distributed.world_size(), "mode": plan.mode.value, "iteration": plan.iteration,
               "step": plan.step, "weights_from": plan.weights_from, "state_from": plan.state_from}
    return record_launch(root, record, cfg, summary)


def _load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer_name or cfg.model.model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"no usable tokenizer in {source} ({str(e).splitlines()[0]}); pass --tokenizer_name DIR") from e
    if tokenizer.pad_token_id is None:  # batches need padding; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def iteration_training_args(cfg: RunConfig, iteration: int):
    """The user's TrainingArguments for one iteration: its own seed, our rotation instead of HF's."""
    args = copy.copy(cfg.training)
    args.seed = cfg.training.seed + iteration
    if cfg.training.data_seed is not None:
        args.data_seed = cfg.training.data_seed + iteration
    args.save_total_limit = None  # rotation runs after our commit, never on uncommitted checkpoints
    return args


_TIMING = ("_runtime", "_per_second")  # wall-clock figures: not part of the iteration's results


def _finished_state(checkpoint: str | None):
    """The TrainerState of a checkpoint taken at the iteration's final step, else None."""
    if checkpoint is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def iteration_train_loss(state, fallback: float) -> float:
    """Mean of the logged training losses of the whole iteration. HF's own `training_loss` covers only
    the steps of the last train() call, so after a resume it would differ from an uninterrupted run."""
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    return sum(losses) / len(losses) if losses else fallback


def run_iteration(ctx: LoopContext, strategy, resolved: Resolved, record: dict, metrics) -> None:
    """One iteration's stages: generate -> train -> evaluate -> commit."""
    cfg, root, plan = ctx.cfg, ctx.root, resolved.plan
    k, n = plan.iteration, cfg.loop.num_iterations
    model = resolved.model
    started = time.time()
    weights_id = manifest_id(root / plan.weights_from) if plan.weights_from != BASE else "base"

    gen_stats: dict[str, Any] = {}
    if strategy.generates(k):
        say(f"🔁 iteration {k + 1}/{n} (iter_{k}) · stage: generate")
        faults.point("stage.generate")
        gen_stats = strategy.generate(k, model, plan.weights_from) or {}

    say(f"🔁 iteration {k + 1}/{n} (iter_{k}) · stage: train"
        + (f" (continuing at step {plan.step})" if plan.step else ""))
    faults.point("stage.train")
    ctx.manager.start_iteration(k, {
        "weights_from": plan.weights_from, "weights_id": weights_id, "state_from": plan.state_from,
        "state_scope": plan.state_scope.value, "experiment_id": record.get("experiment_id"),
    })
    train_ds = build_dataset(strategy.train_rows(k), ctx.tokenizer, cfg.loop.max_seq_length)
    eval_rows = strategy.eval_rows(k)
    eval_ds = build_dataset(eval_rows, ctx.tokenizer, cfg.loop.max_seq_length) if eval_rows else None
    callbacks: list[Any] = [CommitCallback(ctx.manager)]
    if plan.state_scope == StateScope.OPTIMIZER and plan.state_from:
        callbacks.append(OptimizerMomentsCallback(root / plan.state_from))
    if distributed.is_main():
        callbacks.append(TensorBoardCallback(root, k))
    trainer = IterationTrainer(
        model=model,
        args=iteration_training_args(cfg, k),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(ctx.tokenizer.pad_token_id),
        processing_class=ctx.tokenizer,
        callbacks=callbacks,
        checkpoints=ctx.manager,
    )
    resume = str(root / plan.state_from) if plan.state_scope == StateScope.FULL and plan.state_from else None
    try:
        finished = _finished_state(resume)
        if finished is not None:
            # The checkpoint is the iteration's last step: nothing is left to train. (HF Trainer would
            # run one extra step when resumed at max_steps.)
            trainer.state = finished
            training_loss = iteration_train_loss(finished, float("nan"))
        else:
            training_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    except ArtifactWriteError:
        raise
    except OSError as e:
        raise ArtifactWriteError(f"training of iteration {k} failed while writing: "
                                 f"{describe_write_error(e, root)}") from e
    except RuntimeError as e:
        raise TrainingFailed(f"training of iteration {k} failed: {e}") from e

    say(f"🔁 iteration {k + 1}/{n} (iter_{k}) · stage: evaluate")
    faults.point("stage.evaluate")
    results: dict[str, Any] = {"iteration": k, "train_loss": iteration_train_loss(trainer.state, training_loss),
                               "steps": trainer.state.global_step}
    if eval_ds is not None:
        prefix = strategy.eval_prefix
        results.update({key: v for key, v in trainer.evaluate(metric_key_prefix=prefix).items()
                        if key.startswith(prefix + "_") and not key.endswith(_TIMING)})
    results.update(strategy.task_metrics(k, trainer.model))
    results.update(gen_stats)
    results["wall_time_s"] = round(time.time() - started, 2)

    say(f"🔁 iteration {k + 1}/{n} (iter_{k}) · stage: commit")
    faults.point("stage.commit")
    ctx.manager.commit_iteration_model(
        trainer.model, ctx.tokenizer, k, trainer.state.global_step, last=k + 1 >= n,
        max_shard_size=cfg.model.max_shard_size, extra={"metrics": results},
    )
    if metrics is not None:
        metrics.rebuild()
        say("   " + metrics.describe(k))
    distributed.barrier()
    del trainer, model
    resolved.model = None
    gc.collect()
