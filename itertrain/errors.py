"""Exception types; the CLI turns each into an exit code (SPEC §6)."""

from __future__ import annotations


class ItertrainError(Exception):
    """Base class: a failure with a readable one-paragraph message for the user."""

    exit_code = 1


class UsageError(ItertrainError):
    """A flag value, path or combination of flags that cannot be used (exit 2)."""

    exit_code = 2


class RecoveryRefused(ItertrainError):
    """The recovery decision refuses to proceed (explicit artifact missing, silent restart, ...)."""

    exit_code = 2


class LockHeld(ItertrainError):
    """Another live run holds the output directory's lock (exit 3)."""

    exit_code = 3


class TrainingFailed(ItertrainError):
    """Training, evaluation or a stage of the loop failed (exit 1)."""

    exit_code = 1


class ArtifactWriteError(ItertrainError):
    """Writing a checkpoint, an iteration model or a manifest failed (disk full, I/O error, read-only)."""

    exit_code = 1


class RewardFunctionError(ItertrainError):
    """A user reward function raised or returned something that is not a number."""

    exit_code = 1
