"""The two recovery flags of the guide (`--resume_from`, `--resume_from_iteration`), validated. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from itertrain.args import AUTO, NONE, parse_resume_from, parse_resume_from_iteration
from itertrain.layout import BASE

if TYPE_CHECKING:
    from itertrain.args import RunConfig

__all__ = ["AUTO", "BASE", "NONE", "RecoveryFlags", "flags_of", "parse_resume_from", "parse_resume_from_iteration"]


@dataclass(frozen=True)
class RecoveryFlags:
    """What the decision needs from the command line."""

    resume_from: str = NONE
    resume_from_iteration: str = NONE
    overwrite_output_dir: bool = False
    num_iterations: int = 1
    iteration_init: str = "previous"  # previous | base
    lora: str | None = None  # --use_peft: the --iteration_model mode (merged | adapter); None: full fine-tuning

    def __post_init__(self) -> None:
        object.__setattr__(self, "resume_from", parse_resume_from(self.resume_from))
        object.__setattr__(self, "resume_from_iteration", parse_resume_from_iteration(self.resume_from_iteration))

    @property
    def any_auto(self) -> bool:
        return AUTO in (self.resume_from, self.resume_from_iteration)

    @property
    def explicit_iteration(self) -> int | None:
        """K of an explicit --resume_from_iteration iter_K."""
        v = self.resume_from_iteration
        return int(v[5:]) if v not in (AUTO, NONE) else None


def flags_of(cfg: RunConfig) -> RecoveryFlags:
    """The recovery flags of a run's configuration."""
    return RecoveryFlags(
        resume_from=cfg.recovery.resume_from,
        resume_from_iteration=cfg.recovery.resume_from_iteration,
        overwrite_output_dir=cfg.recovery.overwrite_output_dir,
        num_iterations=cfg.loop.num_iterations,
        iteration_init=cfg.loop.iteration_init,
        lora=cfg.lora.mode,
    )
