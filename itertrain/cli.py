"""Command line: `itertrain train|status|verify|init-model|demo|plot`.

Errors are ItertrainError subclasses; this is the one place that turns them into exit codes:
0 done, 1 training failed, 2 usage or recovery refused, 3 lock held by another run, 143 preempted
(stopped on SIGTERM/SIGUSR1 at a committed point), 130 interrupted (SIGINT).
"""

from __future__ import annotations

import os
import signal
import sys

from itertrain import failures
from itertrain.errors import ItertrainError, UsageError

USAGE = """usage: itertrain COMMAND [ARGS]

commands:
  train [flags]                 run or resume an iterative training experiment (= train_iterative.py)
  strategies                    the strategies --strategy accepts (built in, installed, registered)
  status DIR [--resume_from X --resume_from_iteration Y] [--json]
                                what exists in DIR and the recovery plan (writes nothing)
  verify DIR [--json]           deep-verify every artifact (checksums); exit 1 if any is corrupt
  init-model DIR                create a tiny local Llama + character tokenizer
  --version                     print the version
  demo [--output_dir DIR]       the built-in expert-iteration demo on CPU
  plot DIR [--out FILE.png]     per-iteration metrics as a PNG

`itertrain train --help` lists every flag (HF TrainingArguments included)."""


def _demo_threads() -> None:
    """One OpenMP thread for the demo (a user's OMP_NUM_THREADS wins): its matrices are too small to gain
    from more, a second thread spinning while another program holds the core made it 10x slower, and
    the arithmetic then does not depend on the core count. Must run before torch is imported."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _quiet_libraries() -> None:
    # No offline mode here: itertrain loads only local paths (local_files_only), and a user's run may
    # talk to the Hub itself (--push_to_hub, a tracker), which HF_HUB_OFFLINE=1 would refuse.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _offline() -> None:
    """Offline mode for the commands that make their own model (demo, init-model): they need no network.
    Set before transformers is imported; a user's explicit HF_HUB_OFFLINE=0 wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cmd_train(argv: list[str], strategy=None) -> int:
    from itertrain import launcher

    launcher.die_with_launcher()  # first: a worker whose torchrun agent dies must not train on as an orphan
    from itertrain import console, distributed

    if os.environ.get("RANK", "0") == "0":
        console.capture()  # rank 0's console also goes to runs/train-<time>.log once the run may write
    from itertrain.parser import parse_train_args

    early = _catch_stop_signals(argv)
    # Before the flags are parsed: building HF's TrainingArguments would create the process group itself.
    distributed.init(early.dist_timeout_s, early.dist_io_timeout_s)
    from itertrain.loop import run_experiment

    return run_experiment(parse_train_args(argv, strategy))


def cmd_strategies(argv: list[str]) -> int:
    if argv:
        raise UsageError("usage: itertrain strategies")
    from itertrain.strategies import available

    for name, origin in available().items():
        print(f"{name:<20} {origin}")
    print("\nAlso: --strategy package.module:ClassName (a subclass of itertrain.Strategy)")
    return 0


def cmd_status(argv: list[str]) -> int:
    from itertrain.status import status

    return status(argv)


def cmd_verify(argv: list[str]) -> int:
    from itertrain.status import verify

    return verify(argv)


def cmd_init_model(argv: list[str]) -> int:
    from argparse import ArgumentParser

    class P(ArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (usage: {self.format_usage().strip()})")

    p = P(prog="itertrain init-model", allow_abbrev=False,
          description="Create a tiny Llama (~0.9M parameters) with a character tokenizer in DIR, for trying "
                      "itertrain and for tests; it loads offline with from_pretrained(DIR).")
    p.add_argument("dir", metavar="DIR", help="an empty or new directory")
    ns = p.parse_args(argv)
    _offline()
    from itertrain.tiny_model import init_model, parameter_count

    out = init_model(ns.dir)
    print(f"tiny model written to {out} ({parameter_count(out):,} parameters, character tokenizer)")
    return 0


def _catch_stop_signals(argv: list[str]):
    """SIGTERM/SIGUSR1 -> a checkpoint at the next step and exit 143 (itertrain.preemption), with the run's
    --preemption and --preemption_grace_s; returns the flags read before the full parse."""
    from itertrain import preemption
    from itertrain.parser import early_flags

    early = early_flags(argv)
    preemption.install(early.preemption, early.preemption_grace_s)
    return early


def cmd_demo(argv: list[str]) -> int:
    from itertrain import console

    _offline()
    from itertrain.demo import demo

    console.capture()
    _catch_stop_signals(argv)  # the demo is a train run: a SIGTERM stops it as it stops `itertrain train`
    return demo(argv)


def cmd_plot(argv: list[str]) -> int:
    from itertrain.plot import plot_command

    return plot_command(argv)


COMMANDS = {
    "train": cmd_train,
    "strategies": cmd_strategies,
    "status": cmd_status,
    "verify": cmd_verify,
    "init-model": cmd_init_model,
    "demo": cmd_demo,
    "plot": cmd_plot,
}


# Commands that only read and print: like any Unix tool they end quietly when the reader goes away
# (`itertrain status DIR | head`). Training keeps the default, so a closed pipe never stops a run.
READ_ONLY = ("status", "verify", "strategies", "plot")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from itertrain import __version__

        print(f"itertrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        _demo_threads()
    if command in READ_ONLY:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if command not in COMMANDS:
        if command.startswith("--"):  # `itertrain --model_name ...` reads as `itertrain train ...`
            command, rest = "train", argv
        else:
            print(f"itertrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    return guarded(COMMANDS[command], rest)


def guarded(fn, *args, **kwargs) -> int:
    """Run a command; an ItertrainError becomes its exit code and one line, printed by rank 0 only (a
    failure between ranks also by each node's local rank 0). Whatever fails while the ranks stop on a
    preemption signal is part of that stop: exit 143 with the preemption's line."""
    from itertrain import console

    main_rank = os.environ.get("RANK", "0") == "0"
    failures.new_command()
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - mapped to one line below, or re-raised
        error = _preemption_outcome(e) or e
        if isinstance(error, ItertrainError):
            _tell_the_launch(error)
            if console.prints_messages(error.every_node) and failures.say_once():
                print(f"itertrain: {error.label}: {error}", file=sys.stderr, flush=True)
            return error.exit_code
        if not isinstance(e, OSError):
            raise
        if main_rank:  # a failed write outside the paths that name their own (never a traceback)
            from pathlib import Path

            from itertrain.fsutil import describe_write_error

            print(f"itertrain: error: {describe_write_error(e, Path(str(e.filename or '.')))}", file=sys.stderr,
                  flush=True)
        return 1
    except KeyboardInterrupt:
        if main_rank:
            print("itertrain: interrupted; relaunch with --resume_from auto --resume_from_iteration auto",
                  file=sys.stderr, flush=True)
        return 130


def _tell_the_launch(error: BaseException) -> None:
    """How this rank stopped, for its peers (a preemption is not a lost peer); a failure of the user's
    (by type) also ends this torchrun launch: a restarted worker stops at once."""
    failures.publish(failures.outcome_of(error, failures.env_rank()))


def _preemption_outcome(e: BaseException) -> ItertrainError | None:
    """A failure while the ranks stop on a preemption signal, as the preemption it is (None otherwise;
    the module is only loaded by a training command)."""
    preemption = sys.modules.get("itertrain.preemption")
    if preemption is None or not preemption.stopping():
        return None
    from itertrain.errors import Preempted

    return e if isinstance(e, Preempted) else Preempted(preemption.failure_message(e))


def run(argv: list[str] | None = None, *, strategy=None) -> int:
    """Run `itertrain train` from Python (e.g. a script launched by torchrun); returns the exit code.

    `argv`: the flags (default: sys.argv[1:]); `strategy`: a Strategy subclass to run."""
    _quiet_libraries()
    try:
        return guarded(cmd_train, list(sys.argv[1:] if argv is None else argv), strategy)
    finally:
        from itertrain import distributed

        distributed.shutdown()
        preemption = sys.modules.get("itertrain.preemption")
        if preemption is not None:  # the caller's own signal handlers apply again
            preemption.uninstall()


def entry() -> None:
    code = main()
    from itertrain import distributed
    from itertrain.errors import PREEMPTED_EXIT_CODE

    distributed.shutdown()
    if code == PREEMPTED_EXIT_CODE:
        # Everything is committed and the lock released: skip the interpreter's teardown (seconds of
        # module clean-up and garbage collection), which would eat into the launcher's grace period.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
