"""The recovery report: the guide's box (printed by rank 0) and the same content as JSON."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from itertrain.recovery import kinds
from itertrain.recovery.discover import Inventory
from itertrain.recovery.flags import BASE, RecoveryFlags
from itertrain.recovery.plan import Mode, RecoveryPlan, StateScope
from itertrain.weights import holds_adapter_only

RULE = "=" * 60
THIN = "-" * 60

_STATE_TEXT = {
    StateScope.FULL: "optimizer + scheduler + progress + RNG (full restore)",
    StateScope.OPTIMIZER: "optimizer moments only (scheduler and progress restart for the new iteration)",
    StateScope.NONE: "none (fresh training state)",
}


def _show(output_dir: str, rel: str | None, base_model: str) -> str:
    if rel is None:
        return "none"
    if rel == BASE:
        return f"{base_model} (base model)"
    return os.path.join(output_dir, rel)


def _strategy_line(plan: RecoveryPlan) -> str:
    if plan.mode == Mode.FRESH:
        return "🆕 NO checkpoints selected - training from scratch"
    if plan.mode == Mode.COMPLETE:
        return "✅ Experiment COMPLETE - nothing left to train"
    if plan.mode == Mode.ITERATION and plan.weights_from == BASE:
        return "🆕 BASE model for weights (--iteration_init base) - training state starts fresh"
    if plan.mode == Mode.ITERATION:
        return "🎯 ITERATION model only - weights only, training state starts fresh"
    if plan.mode == Mode.BOTH:
        return "🔀 BOTH checkpoints found - using ITERATION model for weights"
    if plan.iteration_model is not None:
        return "🔀 BOTH checkpoints found - using CHECKPOINT for weights (it is newer)"
    return "📁 TRAINER checkpoint only - full restore"


_MODEL_TEXT = {"merged": "model weights only, LoRA adapter merged in",
               "adapter": "LoRA adapter only, for the base model"}


def _lora_line(plan: RecoveryPlan, output_dir: str, base_model: str) -> str:
    on = _show(output_dir, plan.adapter_base, base_model)
    if plan.adapter_from:
        return f"LoRA adapter (--iteration_model {plan.lora}) from {_show(output_dir, plan.adapter_from, base_model)}, on {on}"
    fresh = f"LoRA adapter (--iteration_model {plan.lora}): a fresh adapter on {on}"
    if plan.lora == "merged" and plan.iteration > 0:
        fresh += "; its optimizer moments start fresh (the previous adapter is merged into that model)"
    return fresh


def render(plan: RecoveryPlan, output_dir: str, base_model: str, extra_lines: list[str] | None = None) -> str:
    """The guide's log box, extended with where the run continues, warnings and rejected candidates."""
    lines = [RULE, "CHECKPOINT RECOVERY SYSTEM", RULE]
    if plan.checkpoint is not None:
        c = plan.checkpoint
        lines.append(f"📁 Found trainer checkpoint: {os.path.join(output_dir, c.path)}")
        adapter = plan.lora or holds_adapter_only(os.path.join(output_dir, c.path))
        lines.append(f"   ✅ Contains: {'LoRA adapter' if adapter else 'model weights'} + optimizer + scheduler states")
        if plan.state_from != c.path and plan.weights_from != c.path:
            lines.append("   ⏭️  Not used by this plan")
        lines.append(
            f"   ℹ️  Iteration {c.iteration}, step {c.step}, {c.status.value}"
            + (" (written by another tool)" if c.foreign else "")
        )
    if plan.iteration_model is not None:
        m = plan.iteration_model
        lines.append(f"🎯 Found COMPLETE iteration {m.iteration} model: {os.path.join(output_dir, m.path)}")
        # What the directory holds, also when the plan trains nothing (a complete experiment has no LoRA plan)
        held = "adapter" if holds_adapter_only(os.path.join(output_dir, m.path)) else plan.lora
        lines.append(f"   ⚠️  Contains: {_MODEL_TEXT.get(held, 'model weights only')} (no optimizer/scheduler)")
    if plan.checkpoint is None and plan.iteration_model is None:
        lines.append("📭 No trainer checkpoint or iteration model selected")
    for r in plan.rejected:
        lines.append(f"❌ Rejected {os.path.join(output_dir, r.path)}: {r.reason}")
    lines.append(THIN)
    lines.append("RECOVERY STRATEGY:")
    lines.append(_strategy_line(plan))
    lines.append(f"   📋 Reason: {plan.reason}")
    if plan.mode != Mode.COMPLETE:
        lines.append(f"   🎯 Model weights from: {_show(output_dir, plan.weights_from, base_model)}")
        lines.append(f"   📁 Training state from: {_show(output_dir, plan.state_from, base_model)}")
        lines.append(f"   🔁 Training state applied: {_STATE_TEXT[plan.state_scope]}")
        lines.append(f"   ▶️  Continuing at: {plan.describe_resume()}")
        if plan.lora:
            lines.append(f"   🧩 {_lora_line(plan, output_dir, base_model)}")
    for w in plan.warnings:
        lines.append(f"   ⚠️  {w}")
    for s in plan.supersedes:
        lines.append(f"   📦 {os.path.join(output_dir, s)} will be replaced by this run: moved to superseded/ first")
    for extra in extra_lines or []:
        lines.append(f"   {extra}")
    lines.append(RULE)
    return "\n".join(lines)


def plan_to_json(plan: RecoveryPlan) -> dict[str, Any]:
    d = asdict(plan)
    d["mode"] = plan.mode.value
    d["state_scope"] = plan.state_scope.value
    for key in ("checkpoint", "iteration_model"):
        if d[key] is not None:
            d[key]["status"] = getattr(plan, key).status.value
    return d


def inventory_to_json(inv: Inventory) -> dict[str, Any]:
    """The inventory, one list per registered artifact kind (its `group`)."""
    groups = {kind.group: [kind.to_json(a) for a in inv.group(kind.group)] for kind in kinds.registered()}
    return {"output_dir": inv.output_dir, "is_experiment": inv.is_experiment, **groups}


def report_json(
    plan: RecoveryPlan,
    inv: Inventory,
    flags: RecoveryFlags,
    *,
    world_size: int,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "flags": asdict(flags),
        "world_size": world_size,
        "plan": plan_to_json(plan),
        "inventory": inventory_to_json(inv),
        "notes": list(notes or []),
    }
