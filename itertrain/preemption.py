"""Preemption: SIGTERM or SIGUSR1 -> every rank agrees at the next step boundary -> a
checkpoint is committed at that step -> exit 143 (`PREEMPTED_EXIT_CODE`), one line from rank 0.

How a signal travels:
1. `install` (main thread, before the process group exists) catches SIGTERM and SIGUSR1. The C-level
   handler writes the signal number to a pipe (`signal.set_wakeup_fd`) at once, even while the main
   thread sits inside a C++ collective where no Python handler can run; a watcher thread reads it.
2. Inside training the watcher only records the request and arms the grace deadline. At every step's
   end `PreemptionCallback` all-reduces one integer (MAX, on itertrain's CPU group), so a signal that
   reached one rank or one node reaches every rank at the same step; HF Trainer then saves through its
   normal path and `CommitCallback` commits the checkpoint with its manifest, marked as a preemption
   checkpoint. The loop raises `Preempted` instead of evaluating and committing the iteration.
3. Outside training (start-up, generation, evaluation, the iteration commit) nothing in progress is
   committed, so the watcher stops the process at once: the last committed point is the boundary
   (a regenerated stage is identical, and every artifact commits atomically, so a stop is as safe as
   a kill).
4. A second stop signal or the end of `--preemption_grace_s` stops at once; an unfinished checkpoint
   then has no manifest, and the next launch never uses it. SIGINT (Ctrl-C) keeps Python's own
   behaviour, KeyboardInterrupt at the next instruction of the main thread, except that a copy within
   DUPLICATE_WINDOW_S is the same press (torchrun forwards it); a commit already being written in the
   background lands before the lock is released, exit 130 (cli.guarded).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from transformers import TrainerCallback

from itertrain import console, distributed, failures, launcher
from itertrain.errors import PREEMPTED_EXIT_CODE, Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A launcher that forwards the scheduler's signal (torchrun) makes it arrive twice within milliseconds
# when the scheduler signals every process too (SLURM): that is one request, not a second one.
DUPLICATE_WINDOW_S = 2.0
RELAUNCH = "relaunch with --resume_from auto --resume_from_iteration auto to continue"


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.enabled = False
        self.watching = False  # the watcher thread reads the wakeup pipe (else the handler acts)
        self.grace_s = 25.0
        self.signum: int | None = None  # the first stop signal this rank received
        self.received_at = 0.0
        self.phase = "start-up"
        self.training = False  # inside Trainer.train's loop: stop at the next step boundary
        self.agreed: tuple[int, int] | None = None  # (signal, step) every rank agreed on
        self.deadline: threading.Timer | None = None
        self.done = False  # the stop completed at a committed point: a late deadline exits quietly
        self.interrupted_at: float | None = None  # the first Ctrl-C (SIGINT) this rank received
        self.previous: dict[int, Any] = {}  # the handlers `install` replaced, restored by `uninstall`
        self.pipe: tuple[int, int] | None = None  # the wakeup pipe (read end, write end)
        self.previous_wakeup_fd = -1
        self.fork_hook = False


_state = _State()


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def install(enabled: bool = True, grace_s: float = 25.0) -> None:
    """Catch the stop signals (main thread, first thing in a training process)."""
    _state.grace_s = grace_s
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set on the main thread: the default actions stay
    _end_watcher()  # a second command in one Python process (`main` then `run`): one pipe, one watcher
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # SIG_IGN (a background job) stays
        _keep_previous(signal.SIGINT, signal.signal(signal.SIGINT, _interrupt))  # with --preemption off too
    if not enabled:
        return
    _state.enabled = True
    for s in STOP_SIGNALS:
        _keep_previous(s, signal.signal(s, _handler))
    r, w = os.pipe()
    os.set_blocking(w, False)
    _state.previous_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    _state.pipe, _state.watching = (r, w), True
    threading.Thread(target=_watch, args=(r,), name="itertrain-signal-watch", daemon=True).start()
    if not _state.fork_hook:  # register_at_fork cannot be undone: once per process
        os.register_at_fork(after_in_child=_reset_in_child)
        _state.fork_hook = True


def _keep_previous(signum: int, handler: Any) -> None:
    """Remember the caller's handler for `uninstall`; ours, left by an earlier command, is not the caller's."""
    if handler not in (_handler, _interrupt):
        _state.previous[signum] = handler


def uninstall() -> None:
    """Put back the signal handlers `install` replaced and end the watcher thread (a `cli.run` from
    Python returns to a program whose own handlers apply again)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s, previous in _state.previous.items():
        signal.signal(s, previous)
    _state.previous.clear()
    _state.interrupted_at = None
    _end_watcher()


def _end_watcher() -> None:
    if _state.pipe is None:
        return
    signal.set_wakeup_fd(_state.previous_wakeup_fd)
    _state.watching, _state.enabled = False, False
    r, w = _state.pipe
    _state.pipe = None
    os.close(w)  # the watcher reads end-of-file and returns; it closes the read end


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C: KeyboardInterrupt, as Python does, but once per press. The terminal signals every process
    of the foreground group and torchrun forwards the SIGINT it got, so each rank receives one press twice
    within milliseconds; the copy must not count as the second Ctrl-C that abandons a checkpoint write."""
    now = time.monotonic()
    if _state.interrupted_at is not None and now - _state.interrupted_at < DUPLICATE_WINDOW_S:
        return
    _state.interrupted_at = now
    raise KeyboardInterrupt


def _handler(signum: int, frame: Any) -> None:
    if not _state.watching:  # no wakeup pipe: act here (the watcher otherwise does, at once)
        _on_signal(signum)


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:  # `uninstall` closed the write end
            os.close(fd)
            return
        for signum in data:  # SIGINT's byte comes too (Python's handler is a handler): it is not ours
            if signum in STOP_SIGNALS:
                _on_signal(signum)


def _reset_in_child() -> None:
    """A forked helper (a DataLoader worker) must not write into this process's signal pipe."""
    try:
        signal.set_wakeup_fd(-1)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        if signal.getsignal(signal.SIGINT) is _interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


def _on_signal(signum: int) -> None:
    if signum == signal.SIGTERM and _state.signum is None and launcher.local_peer_exited():
        peer = failures.peer_outcome(distributed.rank(), distributed.world_size())
        if peer is None or peer.exit_code != PREEMPTED_EXIT_CODE:  # a peer that stopped on this signal first
            _group_stopped(peer)
    with _state.lock:
        name = _name(signum)
        if _state.done:  # the stop is complete and committed; this process is on its way out
            return
        if _state.signum is not None:
            if time.monotonic() - _state.received_at < DUPLICATE_WINDOW_S:
                return
            stop_now(PREEMPTED_EXIT_CODE, "preempted", f"a second {name}: stopped at once, before a preemption "
                     f"checkpoint was committed; the newest committed checkpoint is used; {RELAUNCH}")
        _state.signum, _state.received_at = signum, time.monotonic()
        if not _state.training:
            stop_now(PREEMPTED_EXIT_CODE, "preempted", f"{name} during {_state.phase}: stopped at once, at the last "
                     f"committed point (nothing in progress is kept); {RELAUNCH}")
        _arm_deadline()


def _group_stopped(peer: failures.Outcome | None) -> None:
    """torchrun stops the group because a rank of this node exited: say why that rank stopped (the
    (type, message, exit code) it published) or that it is gone, and exit; this is no preemption."""
    me = distributed.rank()
    if peer is not None:
        stop_now(peer.exit_code, peer.error().label, f"{peer.error(f' (on rank {peer.rank})')}")
    stop_now(1, "error", f"rank {me} lost contact with another rank while {_state.phase}: a rank of this node "
             "exited, and torchrun stops the others (it restarts the group when --max-restarts allows). "
             "Committed work is intact; relaunch with --resume_from auto --resume_from_iteration auto")


def stop_now(code: int, label: str, message: str) -> None:
    """Print one line (rank 0) and end this process at once."""
    if code == PREEMPTED_EXIT_CODE:  # a peer that sees this rank gone knows it stopped on the signal too
        failures.publish(failures.Outcome("Preempted", message, code, distributed.rank()))
    if console.prints_messages() and failures.say_once():
        console.emit(f"itertrain: {label}: {message} (exit {code})")
    os._exit(code)


def _arm_deadline() -> None:
    with _state.lock:
        if _state.deadline is not None:
            return
        _state.deadline = threading.Timer(_state.grace_s, _deadline_expired)
        _state.deadline.daemon = True
        _state.deadline.start()


def _deadline_expired() -> None:
    if _state.done:
        os._exit(PREEMPTED_EXIT_CODE)
    stop_now(PREEMPTED_EXIT_CODE, "preempted", f"the preemption checkpoint was not committed within "
             f"--preemption_grace_s={_state.grace_s:g}s: stopped; the unfinished checkpoint is never used (the newest "
             f"committed one is); {RELAUNCH}")


def set_phase(phase: str) -> None:
    """The loop's stage (for messages). A stop requested but not acted upon (it came as training ended)
    happens now: this is a committed boundary."""
    with _state.lock:
        _state.phase, _state.training = phase, False
        if _state.signum is not None and _state.agreed is None:
            stop_now(PREEMPTED_EXIT_CODE, "preempted", f"{_name(_state.signum)} as training ended: stopped before "
                     f"{phase}, at the last committed point; {RELAUNCH}")


def enabled() -> bool:
    return _state.enabled


def stopping() -> bool:
    """A stop was requested on this rank or agreed by all: whatever fails now is part of stopping."""
    return _state.signum is not None or _state.agreed is not None


def agree(step: int) -> bool:
    """Every rank: did any rank receive a stop signal? (one all-reduce). Arms the grace deadline on
    every rank when the answer is yes, as the launcher will kill them all once it runs out."""
    if _state.agreed is not None:
        return True
    signum = distributed.max_over_ranks(_state.signum or 0)
    if not signum:
        return False
    with _state.lock:
        _state.agreed = (signum, step)
    _arm_deadline()
    return True


def checkpoint_extra(step: int) -> dict[str, Any]:
    """What a checkpoint's manifest records when it was saved on preemption."""
    if _state.agreed is None or _state.agreed[1] != step:
        return {}
    return {"preemption": {"signal": _name(_state.agreed[0]), "step": step,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def raise_if_stopped(iteration: int, step: int, committed: bool) -> None:
    """After Trainer.train returned: raise Preempted when the ranks agreed to stop (the iteration is
    then neither evaluated nor committed)."""
    if _state.agreed is None:
        return
    where = f"checkpoint-{step} of iteration {iteration} committed" if committed else \
        f"step {step} of iteration {iteration}; the newest committed checkpoint is used"
    raise Preempted(f"{_name(_state.agreed[0])}: stopped at step {step} ({where}); {RELAUNCH} "
                    f"(exit {PREEMPTED_EXIT_CODE})")


def failure_message(e: BaseException) -> str:
    """The one line for a failure while stopping (a rank that ran out of grace, a collective that broke)."""
    signum = (_state.agreed or (_state.signum or signal.SIGTERM, 0))[0]
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return (f"{_name(signum)}: stopped before the preemption checkpoint was committed ({first}); the newest "
            f"committed checkpoint is used; {RELAUNCH} (exit {PREEMPTED_EXIT_CODE})")


class PreemptionCallback(TrainerCallback):
    """The step-boundary agreement (added after itertrain's CommitCallback, so that at train end the
    last checkpoint's manifest has landed before the final agreement). `every`: the ranks agree only at
    multiples of this many steps (and the last), where a checkpoint holds everything a resume needs."""

    def __init__(self, every: int = 1):
        self.every = max(int(every), 1)

    def on_train_begin(self, args, state, control, **kwargs):
        with _state.lock:
            _state.phase, _state.training = "training", True
            if _state.signum is not None:  # came while training was being set up
                _arm_deadline()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        boundary = state.global_step % self.every == 0 or state.global_step >= state.max_steps
        if _state.agreed is None and boundary and agree(state.global_step):
            signum, step = _state.agreed  # type: ignore[misc]
            if distributed.is_main():
                print(f"⏸️  {_name(signum)}: every rank stops at step {step}; committing checkpoint-{step}", flush=True)
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if agree(state.global_step):  # a signal during the last step's save: every rank takes the same branch
            # Every rank leaves only once rank 0 has committed the checkpoint (CommitCallback waited for it):
            # a rank exiting earlier would make torchrun stop the others, rank 0's commit included.
            distributed.barrier()
            _state.done = True
        with _state.lock:
            _state.training = False
            _state.phase = "after training"
        return control
