"""Command line: `itertrain train|status|verify|init-model|demo|plot` (SPEC §6).

Errors are ItertrainError subclasses; this is the one place that turns them into exit codes:
0 done, 1 training failed, 2 usage or recovery refused, 3 lock held by another run.
"""

from __future__ import annotations

import os
import sys

from itertrain.errors import ItertrainError, UsageError

USAGE = """usage: itertrain COMMAND [ARGS]

commands:
  train [flags]                 run or resume an iterative training experiment (= train_iterative.py)
  strategies                    the strategies --strategy accepts (built in, installed, registered)
  status DIR [--resume_from X --resume_from_iteration Y] [--json]
                                what exists in DIR and the recovery plan (writes nothing)
  verify DIR [--json]           deep-verify every artifact (checksums); exit 1 if any is corrupt
  init-model DIR                create a tiny local Llama + character tokenizer
  demo [--output_dir DIR]       the built-in expert-iteration demo on CPU
  plot DIR [--out FILE.png]     per-iteration metrics as a PNG

`itertrain train --help` lists every flag (HF TrainingArguments included)."""


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
    from itertrain.loop import run_experiment
    from itertrain.parser import parse_train_args

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
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UsageError("usage: itertrain init-model DIR")
    _offline()
    from itertrain.tiny_model import init_model, parameter_count

    out = init_model(argv[0])
    print(f"tiny model written to {out} ({parameter_count(out):,} parameters, character tokenizer)")
    return 0


def cmd_demo(argv: list[str]) -> int:
    _offline()
    from itertrain.demo import demo

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        if command.startswith("--"):  # `itertrain --model_name ...` reads as `itertrain train ...`
            command, rest = "train", argv
        else:
            print(f"itertrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    return guarded(COMMANDS[command], rest)


def guarded(fn, *args, **kwargs) -> int:
    """Run a command; an ItertrainError becomes its exit code and one line, printed by rank 0 only."""
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        return fn(*args, **kwargs)
    except ItertrainError as e:
        if main_rank:
            print(f"itertrain: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if main_rank:
            print("itertrain: interrupted; relaunch with --resume_from auto --resume_from_iteration auto",
                  file=sys.stderr, flush=True)
        return 130


def run(argv: list[str] | None = None, *, strategy=None) -> int:
    """Run `itertrain train` from Python (e.g. a script launched by torchrun); returns the exit code.

    `argv`: the flags (default: sys.argv[1:]); `strategy`: a Strategy subclass to run."""
    _quiet_libraries()
    try:
        return guarded(cmd_train, list(sys.argv[1:] if argv is None else argv), strategy)
    finally:
        from itertrain import distributed

        distributed.shutdown()


def entry() -> None:
    code = main()
    from itertrain import distributed

    distributed.shutdown()
    sys.exit(code)
