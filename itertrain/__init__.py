"""itertrain: iterative training of Hugging Face causal LMs with checkpoint recovery that never loses work.

Public API: `Strategy` (subclass it: override `train_rows(iteration)`), `register_strategy`,
`RecoveryHooks` (the mixin that gives any HF Trainer class the commit protocol) and `run`
(`itertrain train` from Python).
"""

from typing import Any

__version__ = "0.2.0"
__all__ = ["RecoveryHooks", "Strategy", "register_strategy", "run", "__version__"]


def __getattr__(name: str) -> Any:  # imported on first use: `import itertrain` stays light
    if name == "Strategy":
        from itertrain.strategies.base import Strategy

        return Strategy
    if name == "register_strategy":
        from itertrain.strategies.registry import register_strategy

        return register_strategy
    if name == "run":
        from itertrain.cli import run

        return run
    if name == "RecoveryHooks":
        from itertrain.trainer import RecoveryHooks

        return RecoveryHooks
    raise AttributeError(f"module 'itertrain' has no attribute {name!r}")
