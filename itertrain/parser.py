"""Parsing `itertrain train` flags (the CLI layer): HfArgumentParser over the argument dataclasses,
itertrain's groups first and HF's TrainingArguments (or the strategy's subclass of it) last, with
`--config FILE.yaml` underneath the command line. No prefix matching, for flags or YAML keys.
"""

from __future__ import annotations

import os
import sys
from argparse import SUPPRESS, ArgumentParser, Namespace
from dataclasses import fields
from pathlib import Path
from typing import Any


from itertrain.args import (ARGUMENT_GROUPS, TRL_NAMES, DistributedArguments, RunConfig, canonical_name, one_or_several,
                            reward_specs, shared_values)
from itertrain.config_file import check_one_name, read_yaml, yaml_to_argv
from itertrain.errors import UsageError
from itertrain.flag_checks import check_dataset_flags, check_finite
from itertrain.lora import check_settings
from itertrain.sources import resolve_model
from itertrain.strategies import available, load_strategy
from itertrain.strategies.base import Strategy
from itertrain.training_config import added_fields, build_training_arguments

HF_GROUP = "Hugging Face TrainingArguments (all pass through)"


class _SharedFieldsNamespace(Namespace):
    """HfArgumentParser deletes each dataclass's fields from the namespace after building it. A field
    that an itertrain group shares with TrainingArguments (see `Parser._parse_dataclass_field`) is
    taken by the itertrain group, and then is simply absent for TrainingArguments (its default)."""

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop(name, None)


def given_flags(argv: list[str]) -> set[str]:
    """The option names an argument list gives (`--name value` or `--name=value`)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def _groups(strategy: type[Strategy]) -> list[type]:
    from transformers import TrainingArguments

    ours = [*ARGUMENT_GROUPS, *([strategy.arguments_class] if strategy.arguments_class else [])]
    taken = {name for t in ours for f in fields(t)
             for name in (f.name, *(a.lstrip("-") for a in f.metadata.get("aliases", [])))}
    taken |= {TRL_NAMES[n] for n in taken if n in TRL_NAMES}  # a flag under TRL's name is taken by that name too
    added = added_fields(strategy.training_arguments_class or TrainingArguments, taken)
    return [*ours, *([added] if added else []), TrainingArguments]


def _hf_parser(types: list[type], **kwargs: Any):
    """An HfArgumentParser that raises one UsageError instead of printing usage and exiting."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit; we raise one clear error
            raise UsageError(f"{message} (see `itertrain train --help`)")

        @staticmethod
        def _parse_dataclass_field(parser, field):
            # One flag, one meaning: a TrainingArguments field that an itertrain group already defines
            # (transformers 4.x has overwrite_output_dir) stays itertrain's; HF's copy keeps its default.
            if f"--{field.name}" in parser._option_string_actions:
                return
            HfArgumentParser._parse_dataclass_field(parser, field)
            if field.name in TRL_NAMES:
                canonical_name(parser, field.name)

        def parse_known_args(self, args=None, namespace=None):
            return super().parse_known_args(args, _SharedFieldsNamespace() if namespace is None else namespace)

    return Parser(types, allow_abbrev=False, **kwargs)


def make_parser(strategy: type[Strategy]):
    types = _groups(strategy)
    parser = _hf_parser(types, prog="itertrain train",
                    usage="itertrain train --model_name_or_path DIR --output_dir DIR [--resume_from auto|S|none] "
                          "[--resume_from_iteration auto|iter_K|none] [--config FILE.yaml] [flags]",
                    description="Run or resume an iterative training experiment (= train_iterative.py).")
    parser.add_argument("--config", metavar="FILE.yaml", default=SUPPRESS,
                        help="Read flags from a YAML mapping (flag name: value); flags on the command line override it.")
    # HF's flags land in argparse's untitled group, listed first: title it and list it last.
    training = types[-1]
    parser._optionals.title = f"{HF_GROUP}: {training.__module__}.{training.__qualname__}"
    parser._action_groups.remove(parser._optionals)
    parser._action_groups.append(parser._optionals)
    subclass = strategy.training_arguments_class
    shared = subclass is not None and "max_length" in {f.name for f in fields(subclass)}
    for action in parser._actions:
        # --help lists one name per option; the dashed spelling HF adds (--max-steps) still parses.
        action.option_strings = action.option_strings[:1]
        if action.dest == "strategy":  # the registry's names in the help of --strategy
            action.help = f"{action.help} Available: {', '.join(available())}."
        if action.dest == "max_seq_length" and shared:  # one --max_length, both meanings stated
            action.help = (f"{action.help} Also {subclass.__name__}.max_length: the "
                           "sequences its trainer builds are truncated to it too.")
    return parser, types


def early_flags(argv: list[str]) -> DistributedArguments:
    """The flags needed before the full parse, from the command line over `--config`: the process group
    is created, and the signals are caught, before HF's TrainingArguments exist (building them would
    create the process group itself). The full parse reads the same values again."""
    config, _ = _pre_parse(argv)
    data = read_yaml(config) if config else {}
    names = {f.name for f in fields(DistributedArguments)}
    pre = _hf_parser([DistributedArguments])
    given = [a for k, v in data.items() if k in names for a in yaml_to_argv({k: v}, names, str(config))]
    picked: list[str] = []
    for i, a in enumerate(argv):  # only our flags (and a value that follows): the rest is parsed later
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag[2:] in names:
            picked.append(a)
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                picked.append(argv[i + 1])
    (early,) = pre.parse_args_into_dataclasses(args=given + picked)
    return early


def _pre_parse(argv: list[str]) -> tuple[str | None, str | None]:
    """--config and --strategy, read before the full parser exists (the strategy chooses its groups)."""
    pre = ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--strategy")
    ns, _ = pre.parse_known_args(argv)
    return ns.config, ns.strategy


def parse_train_args(argv: list[str] | None = None, strategy: type[Strategy] | None = None) -> RunConfig:
    """Parse and validate the flags of `itertrain train`; raises UsageError (exit 2). `strategy`: a
    Strategy class to run (its name is then the --strategy value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, spec = _pre_parse(argv)
    data = read_yaml(config) if config else {}
    if strategy is not None:
        from itertrain.strategies import register_strategy

        register_strategy(strategy)
        spec = strategy.name
        argv = [*argv, "--strategy", spec]
    spec = spec or str(data.get("strategy") or "sft")
    cls = load_strategy(spec)
    parser, types = make_parser(cls)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    known = {f.name for t in types for f in fields(t) if f.init}
    known |= {TRL_NAMES[n] for n in known if n in TRL_NAMES}
    rest = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")
            and not a.startswith("--config=")]
    check_one_name(given_flags(rest))
    defaults = [a for k, v in cls.training_defaults.items() for a in (f"--{k}", str(v))]
    full = _platform_defaults() + defaults + (yaml_to_argv(data, known, config) if config else []) + rest
    check_sharding(full)  # before HF reads a DeepSpeed config (which needs deepspeed installed)
    try:
        *groups, remaining = parser.parse_args_into_dataclasses(args=full, return_remaining_strings=True)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).strip().splitlines()[0]) from e
    if remaining:
        raise UsageError(f"unrecognized arguments: {' '.join(remaining)} (see `itertrain train --help`; "
                         "flags are never abbreviated)")
    recovery, model, loop, generation, lora, dist_args, *extra, training = groups
    generation.reward_fn = one_or_several(generation.reward_fn)
    strategy_args = extra.pop(0) if cls.arguments_class else None
    if cls.training_arguments_class is not None:
        named = {"model": model, "loop": loop, "generation": generation}
        shared = shared_values([recovery, model, loop, generation, lora, dist_args], cls.training_arguments_class)
        shared |= {name: getattr(named[path.split(".")[0]], path.split(".")[1])
                   for name, path in cls.training_from.items()}
        training = build_training_arguments(cls.training_arguments_class, training, extra[0] if extra else None,
                                            given_flags(full), shared)
    backend = _last_value(full, "--generation_backend")
    if generation.use_vllm and backend not in (None, "vllm"):  # TRL's alias must not silently win
        raise UsageError(f"--use_vllm true and --generation_backend {backend} conflict: --use_vllm is TRL's name "
                         "for --generation_backend vllm; give one of them")
    if model.model_name:  # a Hub id: its snapshot directory in the local cache, from here on
        model.model_name = resolve_model(model.model_name)
    if model.tokenizer_name:
        model.tokenizer_name = resolve_model(model.tokenizer_name, "--tokenizer_name", need=None)
    cfg = RunConfig(model, loop, generation, recovery, training, strategy_args, argv, lora, dist_args)
    check_finite(cfg.groups()[:-1], training)
    check_dataset_flags(loop)
    cls.check_unsupported(cfg)
    validate(cfg)
    cls.check_arguments(cfg)
    from itertrain.generation import check_backend  # imports transformers: only once a run is parsed
    from itertrain.strategies.expert_iteration import SampledDataStrategy

    check_backend(cfg, cls.name, issubclass(cls, SampledDataStrategy))
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
        raise UsageError("--model_name_or_path is required: a local model directory (create one with "
                         "`itertrain init-model DIR`)")
    resolve_model(m.model_name)  # a local model directory, or a Hub id in the local cache
    if not t.output_dir or t.output_dir == "trainer_output" and "--output_dir" not in cfg.argv:
        raise UsageError("--output_dir is required: the experiment directory (created if missing)")
    if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
        raise UsageError(f"--output_dir {t.output_dir} is a file, not a directory: pass a directory (created if missing)")
    if os.path.islink(t.output_dir) and not os.path.isdir(t.output_dir):
        raise UsageError(f"--output_dir {t.output_dir} is a dangling symlink")
    if loop.num_iterations < 1:
        raise UsageError(f"--num_iterations {loop.num_iterations}: must be at least 1")
    if getattr(t, "resume_from_checkpoint", None):
        raise UsageError(
            "--resume_from_checkpoint is HF Trainer's flag; itertrain decides with --resume_from auto|S|none "
            "and --resume_from_iteration auto|iter_K|none"
        )
    if t.save_only_model:
        raise UsageError("--save_only_model writes checkpoints without optimizer state, which cannot be resumed")
    if loop.train_file and loop.dataset_name:
        raise UsageError("--train_file and --dataset_name both name the training rows: pass one of them")
    for group, name in ((loop, "train_file"), (loop, "eval_file"), (cfg.generation, "prompts_file")):
        value = getattr(group, name)
        if value and "{iteration}" not in value and not Path(value).is_file():
            raise UsageError(f"--{name} {value}: no such file")
    gen = cfg.generation
    for spec in reward_specs(gen.reward_fn):
        if ":" not in spec:
            raise UsageError(f"--reward_funcs {spec!r}: expected module:function")
    if gen.reward_fn and gen.reward_model:
        raise UsageError("--reward_funcs and --reward_model both score samples: pass one of them")
    if gen.reward_model and not _is_local_model(gen.reward_model):
        raise UsageError(f"--reward_model {gen.reward_model}: not a local model directory (no config.json)")
    if loop.async_save:  # before the LoRA checks: this refusal needs no PEFT installed
        from itertrain.artifacts.snapshot import launch_refusal

        sharded = "--fsdp" if t.fsdp else "--deepspeed" if t.deepspeed else None
        refusal = launch_refusal(use_peft=cfg.lora.use_peft, sharded=sharded, push_to_hub=bool(t.push_to_hub))
        if refusal:
            raise UsageError(refusal)
    check_settings(cfg.lora)  # LoRA flags; PEFT installed when --use_peft
    if getattr(t, "enable_jit_checkpoint", False):
        raise UsageError(
            "--enable_jit_checkpoint: itertrain's own preemption handling replaces it (on by default, --preemption): "
            "on SIGTERM or SIGUSR1 every rank agrees on one step, commits a checkpoint there and exits 143. HF's "
            "variant saves on each rank alone, commits nothing, and lets the interrupted iteration be committed "
            "as complete"
        )
    hf_timeout = next(f.default for f in fields(type(t)) if f.name == "ddp_timeout")
    if t.ddp_timeout != hf_timeout:  # HF's value would be ignored silently: itertrain creates the group itself
        raise UsageError(f"--ddp_timeout {t.ddp_timeout}: itertrain creates the process group itself and does not "
                         "use it; set --dist_timeout_s (process-group init and training collectives) or "
                         "--dist_io_timeout_s (itertrain's own collectives) instead")
    if cfg.lora.use_peft and (t.fsdp or t.deepspeed):
        raise UsageError("--use_peft with --fsdp or --deepspeed is not supported: itertrain writes a LoRA iteration "
                         "model from the whole PEFT model on rank 0. Train LoRA with plain DDP (drop --fsdp/--deepspeed)")
    check_sharding(["--fsdp", " ".join(map(str, t.fsdp or [])), "--use_cpu", str(t.use_cpu)])
    check_report_to(t.report_to)
    check_launcher(os.environ)


def _last_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, a in enumerate(argv):
        if a == flag:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def check_sharding(argv: list[str]) -> None:
    """--fsdp and --deepspeed need GPUs: under --use_cpu (implied without a GPU) accelerate keeps the run
    plain data-parallel and HF trains with DDP without a word. Refused before anything is written."""
    import torch

    cpu = not torch.cuda.is_available() or str(_last_value(argv, "--use_cpu")).lower() in ("true", "1", "yes")
    if not cpu:
        return
    for name, what in (("--fsdp", "FSDP"), ("--deepspeed", "DeepSpeed")):
        value = _last_value(argv, name)
        if value is not None and value.strip().lower() not in ("", "false", "none", "no", "0", "[]"):
            raise UsageError(
                f"{name} {value}: {what} needs GPUs. On CPU (--use_cpu, implied without a GPU) Hugging Face would "
                f"silently train with plain DDP instead; drop {name} for a CPU run, or run it on GPUs"
            )


def check_launcher(env: Any) -> None:
    """A launcher that asked for several processes but started one (accelerate's CPU launcher without
    mpirun sets MASTER_ADDR/MASTER_PORT for N processes, then runs a single one without WORLD_SIZE)."""
    if env.get("ACCELERATE_USE_CPU") and env.get("MASTER_PORT") and "WORLD_SIZE" not in env:
        raise UsageError(
            "`accelerate launch` asked for several processes but started only this one (its CPU launcher needs "
            "mpirun for more). Launch with torchrun instead: `torchrun --nproc_per_node=N train_iterative.py ...`; "
            "for one process, `accelerate launch --num_processes 1` or plain `itertrain train`"
        )


# --report_to name -> the package that provides it, where the two differ.
_TRACKER_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "kubeflow": "kubeflow-training"}


def check_report_to(report_to: Any) -> None:
    """Every tracker named in --report_to is installed (HF would fail at the first log, mid-run)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", "all")]
    if not names:
        return
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise UsageError(f"--report_to {', '.join(unknown)}: not a tracker Hugging Face supports "
                         f"(choose from {', '.join(INTEGRATION_TO_CALLBACK)}, or none)")
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        packages = " ".join(_TRACKER_PACKAGES.get(n, n) for n in missing)
        raise UsageError(f"--report_to {', '.join(missing)}: the package is not installed in this environment; "
                         f"install it (pip install {packages}) or pass --report_to none")
