"""The iteration loop: recover, then for each iteration generate -> train -> evaluate -> commit.

Read top to bottom: `run_experiment` is the whole experiment; `run_iteration` is one iteration's
stages. Moving from iteration K to K+1 goes through the recovery path a relaunch takes (discover,
plan with auto/auto, verify, load on every rank), so an uninterrupted run and a resumed one start
each iteration from the same bytes. What a relaunch does besides (the lock, the report file, the
launch record, housekeeping after a crash) has nothing to do in between iterations of one launch.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

from itertrain import data_lineage, distributed, faults, generation, heldout, hub, launcher, preemption, trackers
from itertrain.args import RunConfig
from itertrain.artifacts.manager import CheckpointConfig, CheckpointManager
from itertrain.artifacts.manifest import fingerprint
from itertrain.artifacts.retention import RetentionPolicy
from itertrain.errors import ArtifactWriteError, TrainingFailed, UsageError
from itertrain.experiment import DEFINING, check_resume, load_record, record_iteration
from itertrain.layout import MANIFEST_NAME, checkpoint_name
from itertrain.lock import RunLock
from itertrain.lora import ADAPTER, MERGED, settings_of
from itertrain.lora.links import LORA, base_dir, lora_lineage
from itertrain.lora.model import IterationModelSaver, load_iteration_model
from itertrain.metrics import MetricsLog, iteration_train_loss
from itertrain.recovery.flags import AUTO, BASE, RecoveryFlags, flags_of
from itertrain.recovery.plan import Mode, RecoveryPlan, StateScope
from itertrain.recovery.prepare import check_writes, hyperparameters, prepare_output_dir, print_report, resume_changes
from itertrain.recovery.resolve import LoadOptions, Resolved, resolve, restored_lineage
from itertrain.shared_dir import check_same_output_dir
from itertrain.strategies import ModelSource, Strategy, StrategyContext, load_strategy
from itertrain.train_stage import build_trainer, iteration_config, train
from itertrain.trainer import gathered_weights, with_recovery_hooks


def say(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


def run_experiment(cfg: RunConfig) -> int:
    """The whole experiment. Returns the exit code (errors are raised as ItertrainError)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars; the training bar stays
    distributed.init(cfg.dist.dist_timeout_s, cfg.dist.dist_io_timeout_s)  # done already when launched by the CLI
    root = cfg.output_dir
    tokenizer = _load_tokenizer(cfg)  # a bad tokenizer is a usage error: found before anything is written
    manager = _checkpoint_manager(cfg)
    strategy_cls = load_strategy(cfg.loop.strategy)
    ctx = StrategyContext(cfg, root, tokenizer, commit_data=manager.commit_data, move_aside=manager.move_aside)
    strategy = strategy_cls(ctx)
    check_same_output_dir(root)  # a node-local output dir: exit 2, before the lock or anything is written
    lock = RunLock(root)
    read_only = distributed.run_on_main(acquire, lock)  # a read-only dir: a finished experiment is only reported
    wrote = False
    try:
        record = distributed.run_on_main(load_record, root)
        flags, restart_notes = launch_flags(cfg, record)
        opts = LoadOptions(cfg.model.model_name, cfg.model.tokenizer_name, cfg.model.model_dtype,
                           cfg.model.trust_remote_code, settings_of(cfg.lora) if cfg.lora.use_peft else None,
                           cfg.training.seed, deepspeed=bool(cfg.training.deepspeed), fsdp=bool(cfg.training.fsdp))
        defining = (*DEFINING, *strategy_cls.defining_fields)
        config_warnings: list[str] = []

        def before_load(plan: RecoveryPlan) -> None:
            """Everything checkable, before anything is written: the experiment record, the
            iteration's data and reward function, and what this plan would write through a symlink."""
            if plan.mode == Mode.COMPLETE:
                return
            if read_only:
                raise ArtifactWriteError(f"iteration {plan.iteration} cannot run: {read_only}")
            if plan.mode != Mode.FRESH:
                changed = distributed.run_on_main(check_resume, record, cfg, defining)
                applies = distributed.run_on_main(resume_changes, plan, root, iteration_config(cfg, strategy, plan.iteration))
                # A change that resume_changes explains (what applies now, what from the next
                # iteration) is said once, that way, not also as a bare "argument changed".
                explained = tuple(f"argument changed: {line.split(' ', 1)[0]}: " for line in applies)
                config_warnings[:] = [w for w in changed if not w.startswith(explained)] + applies
                distributed.run_on_main(trackers.check_recorded_ids, root, record, cfg.training)
            iterations = range(plan.iteration, cfg.loop.num_iterations)
            distributed.run_on_main(check_writes, plan, root, cfg, [k for k in iterations if strategy.generates(k)],
                                    lambda k: iteration_config(cfg, strategy, k))
            for k in iterations:
                with_recovery_hooks(strategy.trainer_class_for(k))  # one that would bypass the hooks: exit 2
            distributed.run_on_main(strategy.preflight, plan.iteration)
            distributed.run_on_main(heldout.preflight, cfg, ctx.tokenizer)  # --eval_prompts_file and its reward
            # the committed iterations it keeps must have figures of the same held-out prompts
            config_warnings.extend(distributed.run_on_main(heldout.check_unchanged, cfg, root, plan.iteration))
            restored = distributed.run_on_main(restored_lineage, root, plan)
            if restored is not None:  # what the checkpoint depends on but does not hold must be as it was
                source = plan_source(ctx, plan, restored)
                distributed.run_on_main(strategy.check_restored, plan.iteration, source, restored, plan.state_from)
                config_warnings.extend(distributed.run_on_main(
                    data_lineage.check_restored, strategy, plan.iteration, restored, str(plan.state_from),
                    cfg.recovery.allow_config_change))

        resolved = resolve(root, flags, record, opts, before_load=before_load)
        resolved.notes[:0] = restart_notes
        plan = resolved.plan
        distributed.run_on_main(print_report, resolved, cfg, config_warnings)
        if plan.mode == Mode.COMPLETE:
            say(f"✅ {root}: all {cfg.loop.num_iterations} iterations are committed; nothing to do.")
            for line in distributed.run_on_main(hub.push_committed, root, cfg.training) or []:
                say(f"   {line}")  # an upload that failed after the last commit is retried here
            return 0
        wrote = True
        record = distributed.run_on_main(prepare_output_dir, cfg, resolved, record, manager, config_warnings)
        distributed.run_on_main(generation.clear_eval_scratch, root)  # what a stopped vLLM evaluation left
        metrics = MetricsLog(root) if distributed.is_main() else None
        for line in distributed.run_on_main(trackers.open_runs, root, cfg.training) or []:
            say(f"   {line}")
        run_iterations(ctx, strategy, manager, resolved, record, metrics, opts)
        say(f"✅ experiment complete: {cfg.loop.num_iterations} iteration(s) committed in {root}")
        return 0
    finally:
        manager.close()  # every rank: a background write and commit finish before the lock goes
        if distributed.is_main():
            trackers.close_runs()
            lock.release(restore=not wrote)


def run_iterations(ctx: StrategyContext, strategy: Strategy, manager: CheckpointManager, resolved: Resolved,
                   record: dict, metrics: MetricsLog | None, opts: LoadOptions) -> None:
    """Iteration after iteration from the plan's, each next one through recovery with auto/auto (the path a
    relaunch takes, so a run and a resumed run start iteration K+1 from the same bytes)."""
    cfg, root = ctx.cfg, ctx.root
    auto = dataclasses.replace(flags_of(cfg), resume_from=AUTO, resume_from_iteration=AUTO, overwrite_output_dir=False)
    while True:
        run_iteration(ctx, strategy, manager, resolved, record, metrics)
        if resolved.plan.iteration + 1 >= cfg.loop.num_iterations:
            return
        done = resolved.plan.iteration
        resolved = resolve(root, auto, record, opts)
        if resolved.plan.iteration <= done:  # never retrain (and supersede) an iteration just committed
            why = "; ".join(f"{r.path}: {r.reason}" for r in resolved.plan.rejected) or resolved.plan.reason
            raise TrainingFailed(f"iteration {done} was committed, but recovery then planned iteration "
                                 f"{resolved.plan.iteration} again, so the run stops: {why}")
        say(f"➡️  iteration {resolved.plan.iteration}: weights from {resolved.plan.weights_from}, "
            f"training state: {resolved.plan.state_scope.value}"
            + (f" from {resolved.plan.state_from}" if resolved.plan.state_from else ""))


def acquire(lock: RunLock) -> str | None:
    """Take the run lock (rank 0); why the directory is read-only, when it is (no lock is then held)."""
    lock.acquire()
    return lock.read_only


def _data_entry(strategy: Strategy, k: int) -> dict[str, Any]:
    data = data_lineage.current(strategy, k)
    return {data_lineage.KEY: data} if data is not None else {}


def _checkpoint_manager(cfg: RunConfig) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(
        output_dir=cfg.output_dir,
        retention=RetentionPolicy(cfg.training.save_total_limit, cfg.loop.keep_iteration_checkpoints,
                                  # a merged LoRA iteration starts a fresh adapter: no moments to carry
                                  carry_optimizer=cfg.loop.iteration_init == "previous" and cfg.lora.mode != MERGED),
        fsync=cfg.loop.fsync, async_commit=cfg.loop.async_commit, async_save=cfg.loop.async_save,
        world_size=distributed.world_size(), io_timeout_s=cfg.dist.dist_io_timeout_s,
    ))


def launch_flags(cfg: RunConfig, record: dict) -> tuple[RecoveryFlags, list[str]]:
    """The recovery flags of this launch, and a report line when torchrun restarted it: a restarted
    worker continues its launch as auto/auto would (see `launcher.continues_earlier_attempt`)."""
    flags = flags_of(cfg)
    n = launcher.restart_count()
    if n < 1:
        return flags, []
    of = f" of {launcher.max_restarts()}" if launcher.max_restarts() else ""
    if not launcher.continues_earlier_attempt(record):
        return flags, [f"🔁 torchrun restart {n}{of}: no earlier attempt of this launch got to train, so the "
                       "command line's recovery flags apply as written"]
    auto = RecoveryFlags(AUTO, AUTO, False, cfg.loop.num_iterations, cfg.loop.iteration_init)
    return auto, [f"🔁 torchrun restart {n}{of}: continuing this launch as --resume_from auto "
                  "--resume_from_iteration auto (unattended recovery)"]


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


_TIMING = ("_runtime", "_per_second")  # wall-clock figures: not part of the iteration's results


def plan_source(ctx: StrategyContext, plan: RecoveryPlan, restored: dict | None, loaded: Any = None) -> ModelSource:
    """The previous iteration's model, as the plan names it: what this iteration's data comes from.
    `restored`: the lineage of a checkpoint restored in full; `loaded`: the previous model when it is
    already loaded (it is the starting weights)."""
    root, cfg = ctx.root, ctx.cfg
    path = plan.previous_model
    if path is None:
        lineage = restored or {}
        return ModelSource(lineage.get("previous_model") or "unknown", lineage.get("previous_id"),
                           load=lambda: _missing(plan))

    def load():
        nonlocal loaded
        if loaded is None:  # an adapter-only iteration model is loaded on its base model
            loaded = load_iteration_model(root / path, cfg)
        return loaded

    return ModelSource(path, fingerprint(root / path), load)


def _source(ctx: StrategyContext, resolved: Resolved) -> ModelSource:
    plan = resolved.plan
    same = plan.weights_from == plan.previous_model and plan.state_scope != StateScope.FULL
    return plan_source(ctx, plan, resolved.restored, resolved.model if same else None)


def _missing(plan: RecoveryPlan):
    raise TrainingFailed(f"iteration {plan.iteration}'s generated data must be made again, but the model of "
                         f"iteration {plan.iteration - 1} it comes from is gone; resume from an iteration model "
                         f"(--resume_from_iteration) instead")


def run_iteration(ctx: StrategyContext, strategy: Strategy, manager: CheckpointManager, resolved: Resolved,
                  record: dict, metrics) -> None:
    """One iteration's stages: generate -> train -> evaluate -> commit."""
    cfg, root, plan = ctx.cfg, ctx.root, resolved.plan
    k, n = plan.iteration, cfg.loop.num_iterations
    started = time.time()
    source = _source(ctx, resolved)

    gen_stats: dict[str, Any] = {}
    if strategy.generates(k):
        say(f"🔁 iter_{k} of iter_0..iter_{n - 1} · stage: generate")
        preemption.set_phase(f"generate (iteration {k})")
        faults.point("stage.generate")
        gen_stats = strategy.generate(k, source) or {}

    say(f"🔁 iter_{k} of iter_0..iter_{n - 1} · stage: train"
        + (f" (continuing at step {plan.step})" if plan.step else ""))
    preemption.set_phase(f"the set-up of training (iteration {k})")
    faults.point("stage.train")
    # the base model's own identity (a Hub id's: the snapshot it resolved to), not the word "base"
    weights_id = fingerprint(root / plan.weights_from if plan.weights_from != BASE else Path(cfg.model.model_name))
    lora = distributed.run_on_main(lora_lineage, cfg, plan, root)
    manager.start_iteration(k, {
        "weights_from": plan.weights_from, "weights_id": weights_id, "state_from": plan.state_from,
        "state_scope": plan.state_scope.value, "previous_model": source.path, "previous_id": source.fingerprint,
        "experiment_id": record.get("experiment_id"),
        "hyperparameters": hyperparameters(iteration_config(cfg, strategy, k), resolved.restored),
        **strategy.iteration_lineage(k, source),
        **_data_entry(strategy, k),
        **lora,
    })
    train_ds, evaluation = strategy.train_dataset(k), strategy.evaluation(k)
    eval_ds = evaluation.dataset if evaluation is not None else None
    trainer = build_trainer(strategy, manager, resolved, k, train_ds, eval_ds, source)
    resume = str(root / plan.state_from) if plan.state_scope == StateScope.FULL and plan.state_from else None
    training_loss = train(trainer, resume, k, cfg)
    step = trainer.state.global_step
    preemption.raise_if_stopped(k, step, (root / checkpoint_name(step) / MANIFEST_NAME).exists())

    say(f"🔁 iter_{k} of iter_0..iter_{n - 1} · stage: evaluate")
    preemption.set_phase(f"evaluate (iteration {k})")
    faults.point("stage.evaluate")
    results: dict[str, Any] = {"iteration": k, "train_loss": iteration_train_loss(trainer.state, training_loss),
                               "steps": trainer.state.global_step}
    if evaluation is not None:
        prefix = evaluation.prefix
        results.update({key: v for key, v in trainer.evaluate(metric_key_prefix=prefix).items()
                        if key.startswith(prefix + "_") and not key.endswith(_TIMING)})
    results.update(strategy.training_metrics(k, trainer.state))
    results.update(strategy.checked_task_metrics(k, trainer.model))
    results.update(heldout.evaluate(ctx, k, trainer.model))  # --eval_prompts_file: mean reward, pass@k
    results.update(gen_stats)
    results["wall_time_s"] = round(time.time() - started, 2)

    say(f"🔁 iter_{k} of iter_0..iter_{n - 1} · stage: commit")
    preemption.set_phase(f"commit (iteration {k})")
    faults.point("stage.commit")
    model = trainer.model
    if plan.lora:  # the merged model, or the adapter only with the reference to its base model
        model = IterationModelSaver(model, plan.lora, base_dir(root, str(plan.adapter_base), cfg.model.model_name))
    manager.commit_iteration_model(
        model, ctx.tokenizer, k, trainer.state.global_step, last=k + 1 >= n,
        max_shard_size=cfg.model.max_shard_size, metrics=results, replaces=resolved.replaces,
        extra=lora if plan.lora == ADAPTER else {LORA: lora[LORA]} if lora else None,
        state_dict=gathered_weights(trainer),
    )
    if metrics is not None:
        metrics.rebuild()
        record_iteration(root, k, manager.lineage.get("hyperparameters", {}))
        trackers.log_iteration(root, cfg.training, k)
        for line in hub.push_committed(root, cfg.training):  # after the commit, never before
            say("   " + line)
        say("   " + metrics.describe(k))
    distributed.barrier()
    del trainer
    resolved.model = None
    gc.collect()
