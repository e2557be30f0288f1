"""The recovery shell: discover -> decide -> verify -> load and probe on every rank -> fall back.

Rank 0 discovers and decides (the pure `decide`), deep-verifies what the plan chose, and
broadcasts the plan. Every rank then loads the weights and probes the training state it will
read; the outcomes are gathered, and a failure anywhere moves all ranks together to the next older
candidate (auto) or ends the run with exit 2 (explicit values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itertrain import distributed
from itertrain.errors import RecoveryRefused
from itertrain.artifacts.manifest import ManifestError, read_manifest
from itertrain.recovery import kinds
from itertrain.lora.links import check_links
from itertrain.recovery.decide import decide
from itertrain.recovery.discover import Inventory, IterationModel, discover, missing_aux
from itertrain.recovery.flags import BASE, RecoveryFlags
from itertrain.recovery.plan import Mode, RecoveryPlan, StateScope
from itertrain.recovery.restore import (
    describe_load_error,
    load_weights,
    probe_state,
    repair_iteration_model,
    repair_problem,
    weights_dir,
    with_base_configs,
)
from itertrain.weights import holds_adapter_only


@dataclass
class Resolved:
    plan: RecoveryPlan
    inventory: Inventory
    model: Any = None  # the loaded starting weights (None when complete)
    notes: list[str] = field(default_factory=list)  # repairs and other actions taken
    restored: dict | None = None  # lineage of the checkpoint restored in full (what its iteration started with)

    @property
    def replaces(self) -> frozenset[str]:
        """Iteration models this launch rejected: the run writes new ones in their place (moving them aside)."""
        models = {m.path for m in self.inventory.iteration_models}
        return frozenset(r.path for r in self.plan.rejected if r.path in models)

    @property
    def verified(self) -> frozenset[str]:
        """Artifacts deep-verified by this launch."""
        return frozenset(self.plan.to_verify)


@dataclass(frozen=True)
class LoadOptions:
    base_model: str
    tokenizer_dir: str | None
    dtype: str
    trust_remote_code: bool
    lora: dict[str, Any] | None = None  # --use_peft: the run's LoRA settings (itertrain.lora.settings_of)
    seed: int = 0  # --seed: a fresh adapter of iteration K is drawn from seed + K
    deepspeed: bool = False  # DeepSpeed restores weights that only its own files hold
    fsdp: bool = False  # HF restores FSDP-sharded optimizer state only under --fsdp


def verify_artifact(root: Path, inv: Inventory, rel: str, artifact: Any = None) -> str | None:
    """Deep-verify one artifact of the inventory with its kind's check (every byte against its manifest,
    or the structural check for one written by another tool). The reason it fails, None when it passes."""
    kind, found = kinds.kind_of_path({k.group: inv.group(k.group) for k in kinds.registered()}, rel)
    try:
        problems = kind.verify(root, artifact or found)
    except ManifestError as e:
        return f"manifest unreadable: {e}"
    return "verification failed: " + "; ".join(problems) if problems else None


def verify_chosen(root: Path, inv: Inventory, plan: RecoveryPlan) -> dict[str, str]:
    """Deep-verify the plan's artifacts (rank 0). Returns {path: reason} for failures."""
    failures: dict[str, str] = {}
    for rel in plan.to_verify:
        artifact = None
        if plan.iteration_model is not None and rel == plan.iteration_model.path:
            artifact = plan.iteration_model  # with its missing config/tokenizer files looked up
        why = verify_artifact(root, inv, rel, artifact)
        if why:
            failures[rel] = why
    return failures


def with_missing_aux(root: Path, plan: RecoveryPlan) -> RecoveryPlan:
    """The plan with its iteration model's missing config/tokenizer files looked up."""
    if plan.iteration_model is None:
        return plan
    return dataclasses.replace(plan, iteration_model=missing_aux(root, plan.iteration_model))


def decide_verified(
    root: Path, flags: RecoveryFlags, rejected: dict[str, str], record: dict | None
) -> tuple[RecoveryPlan, Inventory]:
    """Rank 0: the newest plan whose chosen artifacts pass deep verification."""
    inv = discover(root, record)
    rejected = dict(rejected)
    while True:
        # decide() raises RecoveryRefused when an explicit value is among the rejected
        plan = with_missing_aux(root, decide(flags, inv, rejected))
        failures = verify_chosen(root, inv, plan)
        if not failures:
            return plan, inv
        rejected.update(failures)


def repair_problems(root: Path, plan: RecoveryPlan, opts: LoadOptions) -> dict[str, str]:
    """Rank 0, before anything is loaded: {model: why} when the chosen iteration model's missing config
    files cannot be recreated (reads only; the repair itself waits for every rank's acceptance)."""
    model = _to_repair(plan)
    if model is None:
        return {}
    try:
        why = repair_problem(model, root, opts.base_model, opts.lora)
    except (ValueError, OSError) as e:
        why = str(e)
    return {model.path: why} if why else {}


def repair(root: Path, plan: RecoveryPlan, opts: LoadOptions) -> tuple[list[str], dict[str, str]]:
    """Rank 0, once every rank accepted the plan: recreate missing config/tokenizer files of the chosen
    iteration model (for LoRA, also of the adapter-only iteration model the adapter comes from)."""
    model = _to_repair(plan)
    if model is None:
        return [], {}
    try:
        return repair_iteration_model(model, root, opts.base_model, opts.tokenizer_dir, opts.lora), {}
    except (ValueError, OSError) as e:
        return [], {model.path: str(e)}


def _to_repair(plan: RecoveryPlan) -> IterationModel | None:
    """The plan's iteration model when it is read and misses config/tokenizer files."""
    model = plan.iteration_model
    if model is None or not model.missing_aux or model.path not in (plan.weights_from, plan.adapter_from,
                                                                     plan.adapter_base):
        return None
    return model


def _missing(plan: RecoveryPlan, rel: str | None) -> tuple[str, ...]:
    """The config files of `rel` that are gone: read from the base model until the repair writes them."""
    model = _to_repair(plan)
    return model.missing_aux if model is not None and model.path == rel else ()


def _load_weights(root: Path, plan: RecoveryPlan, opts: LoadOptions) -> tuple[Any, dict[str, str]]:
    """The starting weights on this rank: a full model, or for LoRA the model the adapter applies to
    plus the adapter (fresh or loaded). (model, {artifact: why it failed})."""
    where = f"loading weights failed on rank {distributed.rank()}: "
    if plan.lora:
        from itertrain.lora.model import AdapterLoadError, attach_adapter, load_full
        from itertrain.lora.links import base_dir

        assert plan.adapter_base is not None and opts.lora is not None
        directory = base_dir(root, plan.adapter_base, opts.base_model)
        try:
            missing = _missing(plan, plan.adapter_base)
            full = (with_base_configs(directory.resolve(), opts.base_model, opts.dtype, opts.trust_remote_code, missing)
                    if missing else load_full(directory, opts.dtype, opts.trust_remote_code))
        except Exception as e:  # noqa: BLE001 - any load failure rejects the candidate
            return None, {plan.adapter_base: where + describe_load_error(directory, e)}
        adapter = root / plan.adapter_from if plan.adapter_from else None
        try:
            return attach_adapter(full, opts.lora, seed=opts.seed + plan.iteration, adapter_dir=adapter), {}
        except AdapterLoadError as e:
            return None, {str(plan.adapter_from): where + str(e)}
        except Exception as e:  # noqa: BLE001
            return None, {str(plan.adapter_from): where + describe_load_error(adapter or directory, e)}
    directory = weights_dir(plan, root, opts.base_model)
    key = plan.weights_from if plan.weights_from != BASE else BASE
    if holds_adapter_only(directory):  # transformers would load the base named inside, with a frozen adapter
        return None, {key: f"{directory.name} holds a LoRA adapter only, not full model weights: run with --use_peft "
                           "(and the --iteration_model it was trained with)"}
    try:
        return load_weights(directory, opts.base_model, opts.dtype, opts.trust_remote_code, deepspeed=opts.deepspeed,
                            missing=_missing(plan, plan.weights_from)), {}
    except Exception as e:  # noqa: BLE001 - any load failure rejects the candidate
        return None, {key: where + describe_load_error(Path(directory), e)}


def load_and_probe(root: Path, plan: RecoveryPlan, opts: LoadOptions) -> tuple[Any, dict[str, str], list[str]]:
    """Every rank: load the starting weights and check the state files. (model, failures, warnings)."""
    model, failures = _load_weights(root, plan, opts)
    if failures:
        return None, failures, []
    problems, warnings = probe_state(plan, root, model, distributed.rank(), distributed.world_size(), fsdp=opts.fsdp)
    if problems:
        assert plan.state_from is not None
        failures[plan.state_from] = f"rank {distributed.rank()}: " + "; ".join(problems)
    return model, failures, warnings


def restored_lineage(root: Path, plan: RecoveryPlan) -> dict | None:
    """The lineage a checkpoint restored in full recorded (what its iteration started from); None when
    the plan restores no checkpoint in full, {} for one without a manifest."""
    return _restored(root, plan)[0]


def _restored(root: Path, plan: RecoveryPlan) -> tuple[dict | None, list[str]]:
    """(lineage of the checkpoint restored in full, report lines about it): the lineage says what its
    iteration started with; a preemption checkpoint is named as one."""
    if plan.state_scope != StateScope.FULL or not plan.state_from:
        return None, []
    try:
        manifest = read_manifest(root / plan.state_from)
    except ManifestError:
        return None, []
    if manifest is None:
        return {}, []
    notes = []
    stop = manifest.extra.get("preemption")
    if isinstance(stop, dict):
        notes.append(f"⏸️  {plan.state_from} is a preemption checkpoint ({stop.get('signal')} at step {stop.get('step')}, "
                     f"{stop.get('time')}): the run stopped there and continues from it")
    return dict(manifest.lineage), notes


def resolve(
    root: Path,
    flags: RecoveryFlags,
    record: dict | None,
    opts: LoadOptions,
    *,
    before_load=None,
) -> Resolved:
    """The plan every rank will follow, with its starting weights loaded. Raises RecoveryRefused.

    `before_load(plan)` runs on every rank once per candidate plan, before anything is written
    (used for the experiment-record comparison, which may refuse). Nothing is written here until every
    rank loaded and probed the plan: then rank 0 recreates missing config files of the chosen model.
    """
    rejected: dict[str, str] = {}
    while True:
        plan, inv = distributed.run_on_main(decide_verified, root, flags, rejected, record)
        if plan.mode == Mode.COMPLETE:
            return Resolved(plan, inv, None, [])
        if before_load is not None:
            before_load(plan)
        failed = distributed.run_on_main(check_links, root, plan, opts.base_model)  # LoRA: what each adapter applies to
        if failed:
            rejected.update(failed)
            continue
        failed = distributed.run_on_main(repair_problems, root, plan, opts)
        if failed:
            rejected.update(failed)
            continue
        model, failures, warnings = load_and_probe(root, plan, opts)
        outcomes = distributed.all_gather((failures, warnings))
        failures = {k: v for f, _ in outcomes for k, v in f.items()}
        if not failures:  # every rank accepted the plan: only now is anything written
            repaired, failures = distributed.run_on_main(repair, root, plan, opts)
        if not failures:
            all_warnings = sorted({w for _, ws in outcomes for w in ws})
            plan = dataclasses.replace(plan, warnings=plan.warnings + tuple(all_warnings))
            restored, restored_notes = distributed.run_on_main(_restored, root, plan)
            return Resolved(plan, inv, model, repaired + restored_notes, restored)
        if BASE in failures:
            raise RecoveryRefused(f"the base model {opts.base_model} cannot be loaded: {failures[BASE]}")
        del model
        rejected.update(failures)
