"""Strategies: what each iteration trains on (SPEC §4)."""

from __future__ import annotations

from itertrain.strategies.base import LoopContext, Strategy


def make_strategy(ctx: LoopContext) -> Strategy:
    name = ctx.cfg.loop.strategy
    if name == "sft":
        from itertrain.strategies.sft import SFTStrategy

        return SFTStrategy(ctx)
    if name == "expert_iteration":
        from itertrain.strategies.expert_iteration import ExpertIterationStrategy

        return ExpertIterationStrategy(ctx)
    raise ValueError(f"unknown strategy {name!r}")


__all__ = ["LoopContext", "Strategy", "make_strategy"]
