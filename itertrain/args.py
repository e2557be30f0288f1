"""Command-line arguments: dataclasses parsed by HfArgumentParser, with --config FILE.yaml.

Every HF `TrainingArguments` flag passes through; itertrain adds the model, loop and recovery
groups. Values from the YAML file come first and the command line overrides them.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentParser
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from itertrain.errors import UsageError
from itertrain.recovery.plan import RecoveryFlags, parse_resume_from, parse_resume_from_iteration

STRATEGIES = ("sft", "expert_iteration")
TASKS = ("arithmetic",)


@dataclass
class ModelArguments:
    model_name: str = field(
        default=None,  # type: ignore[assignment]
        metadata={"help": "Base model: a local Hugging Face model directory (nothing is downloaded)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer directory (default: model_name)."})
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the trained weights (float32 keeps fp32 master weights under --bf16).",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code (off by default)."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard iteration models above this size."})


@dataclass
class LoopArguments:
    num_iterations: int = field(default=1, metadata={"help": "Iterations 0..N-1 to run."})
    strategy: str = field(default="sft", metadata={"help": "What each iteration trains on.", "choices": list(STRATEGIES)})
    train_file: str | None = field(
        default=None,
        metadata={"help": "JSONL with prompt/completion or text; may contain {iteration}. For expert_iteration: "
                          "labeled data for iteration 0."},
    )
    eval_file: str | None = field(default=None, metadata={"help": "JSONL for the held-out loss (may contain {iteration})."})
    iteration_init: str = field(
        default="previous",
        metadata={"help": "Start iteration K from iter_{K-1} (previous) or from the base model every time (base, "
                          "as ReST-EM does).", "choices": ["previous", "base"]},
    )
    max_seq_length: int = field(default=256, metadata={"help": "Truncate training examples to this many tokens."})
    keep_iteration_checkpoints: bool = field(
        default=False, metadata={"help": "Move an iteration's trainer checkpoints into iter_K/ instead of deleting them."}
    )
    fsync: bool = field(default=True, metadata={"help": "fsync every file of an artifact before its manifest commits it."})
    async_commit: bool = field(
        default=True, metadata={"help": "Write checkpoint manifests (fsync + checksums) on a thread while training goes on."}
    )
    task: str | None = field(default=None, metadata={"help": "Built-in task providing data and metrics.", "choices": [None, *TASKS]})
    prompts_file: str | None = field(
        default=None, metadata={"help": "expert_iteration: JSONL prompt/answer to sample from (may contain {iteration})."}
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "expert_iteration: completions sampled per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "expert_iteration: sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "expert_iteration: nucleus sampling."})
    max_new_tokens: int = field(default=16, metadata={"help": "expert_iteration: tokens generated per sample."})
    generation_batch_size: int = field(default=64, metadata={"help": "expert_iteration: prompts per generate() call."})
    reward_fn: str | None = field(
        default=None, metadata={"help": "expert_iteration: module:function(prompt, completion, answer) -> float."}
    )
    reward_threshold: float = field(default=1.0, metadata={"help": "expert_iteration: keep samples with reward >= this."})
    data_policy: str = field(
        default="fresh",
        metadata={"help": "expert_iteration: train on this iteration's accepted data (fresh) or all so far (cumulative).",
                  "choices": ["fresh", "cumulative"]},
    )


@dataclass
class RecoveryArguments:
    resume_from: str = field(
        default="none", metadata={"help": "Trainer checkpoint to resume: auto | none | S (checkpoint-S)."}
    )
    resume_from_iteration: str = field(
        default="none", metadata={"help": "Iteration model to resume from: auto | none | iter_K."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start from scratch over committed progress (old artifacts are moved aside)."}
    )
    allow_config_change: bool = field(
        default=False, metadata={"help": "Resume even though model, strategy or data differ from itertrain.json."}
    )

    def __post_init__(self) -> None:
        self.resume_from = parse_resume_from(self.resume_from)
        self.resume_from_iteration = parse_resume_from_iteration(self.resume_from_iteration)


@dataclass
class RunConfig:
    """Everything one launch needs, parsed and validated."""

    model: ModelArguments
    loop: LoopArguments
    recovery: RecoveryArguments
    training: Any  # transformers.TrainingArguments
    argv: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    def recovery_flags(self) -> RecoveryFlags:
        return RecoveryFlags(
            resume_from=self.recovery.resume_from,
            resume_from_iteration=self.recovery.resume_from_iteration,
            overwrite_output_dir=self.recovery.overwrite_output_dir,
            num_iterations=self.loop.num_iterations,
            iteration_init=self.loop.iteration_init,
        )


def _make_parser():
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit; we raise one clear error
            raise UsageError(f"{message} (see `itertrain train --help`)")

    return Parser((ModelArguments, LoopArguments, RecoveryArguments, TrainingArguments))


def _yaml_to_argv(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            import json

            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config")
    ns, rest = pre.parse_known_args(argv)
    return ns.config, rest


def parse_train_args(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate the flags of `itertrain train`; raises UsageError (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, rest = _split_config(argv)
    full = _platform_defaults() + (_yaml_to_argv(config) if config else []) + rest
    parser = _make_parser()
    if any(a in ("-h", "--help") for a in rest):
        parser.print_help()
        raise SystemExit(0)
    try:
        model, loop, recovery, training = parser.parse_args_into_dataclasses(args=full)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).strip().splitlines()[0]) from e
    cfg = RunConfig(model, loop, recovery, training, argv)
    validate(cfg)
    return cfg


def _platform_defaults() -> list[str]:
    """Defaults that depend on the machine; the YAML file and the command line override them."""
    import torch

    if torch.cuda.is_available():
        return []
    # Without a GPU, accelerate only sets up a multi-process (gloo) run when told it is a CPU run.
    return ["--use_cpu", "true", "--dataloader_pin_memory", "false"]


def _is_local_model(name: str) -> bool:
    return Path(name).is_dir() and (Path(name) / "config.json").is_file()


def validate(cfg: RunConfig) -> None:
    """Checks that need no lock and write nothing."""
    m, loop, t = cfg.model, cfg.loop, cfg.training
    if not m.model_name:
        raise UsageError("--model_name is required: a local model directory (create one with `itertrain init-model DIR`)")
    if not _is_local_model(m.model_name):
        what = "does not exist" if not Path(m.model_name).exists() else "is not a model directory (no config.json)"
        raise UsageError(
            f"--model_name {m.model_name} {what}. itertrain never downloads models: pass a local Hugging Face "
            f"model directory, or create a tiny one with `itertrain init-model {m.model_name}`"
        )
    if m.tokenizer_name and not Path(m.tokenizer_name).is_dir():
        raise UsageError(f"--tokenizer_name {m.tokenizer_name} does not exist (pass a local tokenizer directory)")
    if not t.output_dir or t.output_dir == "trainer_output" and "--output_dir" not in cfg.argv:
        raise UsageError("--output_dir is required: the experiment directory (created if missing)")
    if loop.num_iterations < 1:
        raise UsageError(f"--num_iterations {loop.num_iterations}: must be at least 1")
    if getattr(t, "resume_from_checkpoint", None):
        raise UsageError(
            "--resume_from_checkpoint is HF Trainer's flag; itertrain decides with --resume_from auto|S|none "
            "and --resume_from_iteration auto|iter_K|none"
        )
    if t.save_only_model:
        raise UsageError("--save_only_model writes checkpoints without optimizer state, which cannot be resumed")
    if loop.strategy == "sft" and not loop.train_file and not loop.task:
        raise UsageError("--strategy sft needs --train_file (JSONL with prompt/completion or text) or --task arithmetic")
    if loop.strategy == "expert_iteration" and not loop.task and not (loop.prompts_file and loop.train_file):
        raise UsageError(
            "--strategy expert_iteration needs --task arithmetic, or --train_file (labeled data for iteration 0) "
            "and --prompts_file (prompt/answer JSONL to sample from)"
        )
    for name in ("train_file", "eval_file", "prompts_file"):
        value = getattr(loop, name)
        if value and "{iteration}" not in value and not Path(value).is_file():
            raise UsageError(f"--{name} {value}: no such file")
    if loop.reward_fn and ":" not in loop.reward_fn:
        raise UsageError(f"--reward_fn {loop.reward_fn!r}: expected module:function")
    if loop.samples_per_prompt < 1 or loop.generation_batch_size < 1 or loop.max_new_tokens < 1:
        raise UsageError("--samples_per_prompt, --generation_batch_size and --max_new_tokens must be at least 1")
    if os.path.islink(t.output_dir) and not os.path.isdir(t.output_dir):
        raise UsageError(f"--output_dir {t.output_dir} is a dangling symlink")


def parse_recovery_only(argv: list[str]) -> RecoveryArguments:
    """`itertrain status DIR --resume_from ... --resume_from_iteration ...`."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--resume_from", default="auto")
    p.add_argument("--resume_from_iteration", default="auto")
    ns, rest = p.parse_known_args(argv)
    if rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
    return RecoveryArguments(resume_from=ns.resume_from, resume_from_iteration=ns.resume_from_iteration)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}
