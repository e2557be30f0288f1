"""Strategies: what each iteration trains on. The plug-in API is `Strategy` and
`register_strategy`; `load_strategy` finds one by name, entry point or `module:Class`."""

from itertrain.strategies.base import Evaluation, ModelSource, Strategy, StrategyContext
from itertrain.strategies.registry import available, load_strategy, register_strategy

__all__ = ["Evaluation", "ModelSource", "Strategy", "StrategyContext", "available", "load_strategy", "register_strategy"]
