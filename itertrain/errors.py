"""Exception types; the CLI turns each into an exit code."""

from __future__ import annotations


class ItertrainError(Exception):
    """Base class: a failure with a readable one-paragraph message for the user."""

    exit_code = 1
    label = "error"  # the message reads `itertrain: <label>: <message>`
    every_node = False  # printed by rank 0 only; True: also by each node's local rank 0


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


class TrackerUnavailable(ItertrainError):
    """A tracker (W&B, MLflow) could not open the experiment's run: its server did not answer, or its
    settings are wrong. Exit 1, retried by torchrun like any failure: an outage may be over by then."""

    exit_code = 1


class DistributedFailure(ItertrainError):
    """Another rank or node is gone or did not answer in time (exit 1). Printed on every node, so each
    node's own log says why it stopped; torchrun restarts the job when restarts remain."""

    exit_code = 1
    every_node = True


class PeerFailed(ItertrainError):
    """Another rank failed with an error that is not itertrain's own (a library's, an OSError): re-raised
    here from the (type name, message, exit code) it published. Retried by torchrun like any failure."""

    exit_code = 1


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what schedulers treat as "terminated, retry" (docs/design.md §6)


class Preempted(ItertrainError):
    """Stopped on SIGTERM/SIGUSR1 at a committed point: a checkpoint at the step it stopped, or the last
    committed stage boundary. Relaunching with auto/auto resumes there (exit 143)."""

    exit_code = PREEMPTED_EXIT_CODE
    label = "preempted"
