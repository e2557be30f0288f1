"""The reference model of a KL-regularised iteration (iterative DPO, GRPO, RLOO), as the plan names it.

The reference is the iteration's starting model (`start`: the previous iteration's model, or the base model
under --iteration_init base) or the base model (`base`). It is not in the checkpoints: each iteration
records its name and fingerprint in the lineage of its checkpoints and model, and a launch that resumes a
checkpoint reloads the reference from its source and refuses (exit 2) when it is gone, changed or damaged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from itertrain.artifacts.manifest import ManifestError, fingerprint, read_manifest, verify_checksums
from itertrain.errors import RecoveryRefused
from itertrain.strategies.base import ModelSource, StrategyContext


def reference(ctx: StrategyContext, choice: str, source: ModelSource, iteration: int = 1) -> tuple[str, str | None, Path]:
    """(name, fingerprint, directory) of the reference model of `iteration`, whose previous model is `source`;
    `choice`: "start" or "base" (--ref_model). Iteration 0 starts from the base model: that is its reference."""
    cfg = ctx.cfg
    if choice == "base" or cfg.loop.iteration_init == "base" or iteration == 0:
        base = Path(cfg.model.model_name)
        return f"base model {os.path.abspath(base)}", fingerprint(base), base
    return source.path, fingerprint(ctx.root / source.path), ctx.root / source.path


def reference_lineage(ctx: StrategyContext, choice: str, source: ModelSource, iteration: int = 1) -> dict[str, Any]:
    """The lineage entries naming the reference: {"ref_model": name, "ref_model_id": fingerprint}."""
    name, fp, _ = reference(ctx, choice, source, iteration)
    return {"ref_model": name, "ref_model_id": fp}


def check_reference(ctx: StrategyContext, choice: str, source: ModelSource, iteration: int,
                    lineage: dict[str, Any], checkpoint: str, what: str) -> None:
    """Refuse (RecoveryRefused, exit 2) to continue `checkpoint` of `iteration` when the reference it was
    trained against (`lineage`) is gone, differs from this launch's, or fails its checksums. `what`: the
    method, for the message (e.g. "DPO")."""
    if "ref_model_id" not in lineage:
        return  # a checkpoint from a tool that did not record a reference
    name, now, directory = reference(ctx, choice, source, iteration)
    was = f"{lineage.get('ref_model')} (fingerprint {lineage['ref_model_id']})"
    advice = (f"Put that reference model back, or restart iteration {iteration} from its starting model "
              "(--resume_from none --resume_from_iteration auto).")
    if not directory.is_dir():
        raise RecoveryRefused(f"{checkpoint} of iteration {iteration} was trained against the reference model "
                              f"{was}, which is gone ({directory}). {advice}")
    if now != lineage["ref_model_id"]:
        raise RecoveryRefused(f"{checkpoint} of iteration {iteration} was trained against the reference model "
                              f"{was}, but this launch's reference is {name} (fingerprint {now}): {what} would "
                              f"continue against a different model. {advice}")
    try:
        manifest = read_manifest(directory)
    except ManifestError as e:
        raise RecoveryRefused(f"the reference model {name} cannot be verified: {e}. {advice}") from e
    problems = verify_checksums(directory, manifest) if manifest is not None else []
    if problems:
        raise RecoveryRefused(f"the reference model {name} of {checkpoint} is damaged: {'; '.join(problems)}. "
                              f"{advice}")
