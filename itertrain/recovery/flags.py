"""The two recovery flags of the guide (`--resume_from`, `--resume_from_iteration`), validated. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from itertrain.errors import UsageError

AUTO, NONE = "auto", "none"
BASE = "base"  # a weights source meaning --model_name
_STEP_RE = re.compile(r"^[0-9]+$")
_ITER_RE = re.compile(r"^iter_[0-9]+$")


def parse_resume_from(value: str) -> str:
    """Validate --resume_from: auto | none | a non-negative integer step."""
    v = str(value).strip()
    if v.lower() in (AUTO, NONE):
        return v.lower()
    if _STEP_RE.match(v):
        return str(int(v))
    raise UsageError(
        f"--resume_from {value!r} is not valid: use 'auto' (newest trainer checkpoint), 'none', "
        "or a step number such as 20 (meaning checkpoint-20)"
    )


def parse_resume_from_iteration(value: str) -> str:
    """Validate --resume_from_iteration: auto | none | iter_K."""
    v = str(value).strip()
    if v.lower() in (AUTO, NONE):
        return v.lower()
    if _ITER_RE.match(v):
        return f"iter_{int(v[5:])}"
    raise UsageError(
        f"--resume_from_iteration {value!r} is not valid: use 'auto' (newest complete iteration model), "
        "'none', or iter_K such as iter_2"
    )


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
