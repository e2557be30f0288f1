"""The run's configuration: dataclasses on the ground floor of the package.

The CLI layer (`itertrain.parser`) parses them with HfArgumentParser, each group under its own title
in `--help`; the loop, the recovery shell and the strategies read them. Nothing here imports a
strategy, the parser or torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from itertrain.errors import UsageError

AUTO, NONE = "auto", "none"
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


RESUME_ENV = "ITERTRAIN_RESUME"  # =auto: both recovery flags default to auto (a requeue script's one setting)


def resume_default() -> str:
    """The default of --resume_from and --resume_from_iteration: none, or auto under ITERTRAIN_RESUME=auto."""
    value = os.environ.get(RESUME_ENV, "").strip().lower()
    if value not in ("", "none", "auto"):
        raise UsageError(f"{RESUME_ENV}={os.environ[RESUME_ENV]!r} is not valid: set it to auto (a relaunch continues "
                         "where the last one stopped, as --resume_from auto --resume_from_iteration auto) or unset it")
    return value or "none"


# TRL's flag name for a field itertrain first named otherwise: `--help` shows TRL's name (canonical; messages
# use it too), and the older name stays accepted on the command line and as a YAML key.
TRL_NAMES = {
    "model_name": "model_name_or_path",
    "samples_per_prompt": "num_generations",
    "max_new_tokens": "max_completion_length",
    "reward_fn": "reward_funcs",
    "model_dtype": "dtype",
    "max_seq_length": "max_length",
}


def flag(name: str) -> str:
    """The flag of the field `name` as users type it: `--` and TRL's name where itertrain's older one differs."""
    return "--" + TRL_NAMES.get(name, name)


def canonical_name(parser: Any, name: str) -> None:
    """The action of field `name` shows TRL's name only (`--help`, argparse's messages); its older names
    (--name, --name-with-dashes) still parse to it."""
    action = parser._option_string_actions[f"--{name}"]
    canonical = flag(name)
    if parser._option_string_actions.get(canonical, action) is not action:  # (an alias of this field is fine)
        raise RuntimeError(f"{canonical} is defined twice")  # a programming error: two fields, one flag
    action.option_strings = [canonical]
    if action.choices is None:
        action.metavar = canonical.removeprefix("--").upper()
    parser._option_string_actions[canonical] = action


def shared_values(cfg_groups: list[Any], subclass: type) -> dict[str, Any]:
    """Fields of a TrainingArguments subclass that an itertrain flag under TRL's name sets (one flag, one
    meaning): e.g. iterative_dpo's --max_length truncates both the SFT examples and DPOConfig's sequences."""
    names = {f.name for f in fields(subclass)}
    return {TRL_NAMES[f.name]: getattr(g, f.name) for g in cfg_groups for f in fields(g)
            if f.name in TRL_NAMES and TRL_NAMES[f.name] in names}


def one_or_several(specs: Any) -> Any:
    """--reward_funcs as parsed (a list: the flag takes several) as the config keeps it: one function as its
    string (as experiments written before the flag took several hold it), several as a list, none as None."""
    if isinstance(specs, (list, tuple)):
        return specs[0] if len(specs) == 1 else list(specs) or None
    return specs


def reward_specs(value: Any) -> list[str]:
    """The reward functions a --reward_funcs value names (none: [])."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass
class RecoveryArguments:
    _argument_group_name = "recovery (the guide's flags)"

    resume_from: str = field(
        default_factory=resume_default,
        metadata={"help": "Trainer checkpoint to resume: auto (newest committed) | none | S (checkpoint-S). "
                          f"Default none; auto when the environment sets {RESUME_ENV}=auto."}
    )
    resume_from_iteration: str = field(
        default_factory=resume_default,
        metadata={"help": "Iteration model to resume from: auto (newest complete) | none | iter_K. "
                          f"Default none; auto when the environment sets {RESUME_ENV}=auto."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start from scratch over committed progress (old artifacts are moved to superseded/)."}
    )
    allow_config_change: bool = field(
        default=False, metadata={"help": "Resume even though model, strategy or data differ from itertrain.json."}
    )

    def __post_init__(self) -> None:
        self.resume_from = parse_resume_from(self.resume_from)
        self.resume_from_iteration = parse_resume_from_iteration(self.resume_from_iteration)
        if self.overwrite_output_dir and resume_default() == "auto":
            # Starting over is what --overwrite_output_dir asks for; the environment's auto must not turn it
            # into a resume (auto/auto would continue the committed progress and never move it aside).
            self.resume_from = "none" if self.resume_from == "auto" else self.resume_from
            self.resume_from_iteration = "none" if self.resume_from_iteration == "auto" else self.resume_from_iteration


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name: str = field(
        default=None,  # type: ignore[assignment]
        metadata={"help": "Base model: a local Hugging Face model directory (nothing is downloaded). "
                          "Alias: --model_name."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory, or a Hub id in the local cache (default: --model_name_or_path's)."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the trained weights (float32 keeps fp32 master weights under --bf16). "
                          "Alias: --model_dtype.",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code (off by default)."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard iteration models above this size."})


@dataclass
class LoopArguments:
    _argument_group_name = "iteration loop"

    num_iterations: int = field(default=1, metadata={"help": "Iterations 0..N-1 to run."})
    strategy: str = field(
        default="sft",
        metadata={"help": "What each iteration trains on: a registered name, or package.module:ClassName "
                          "(`itertrain strategies` lists them)."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "JSONL with prompt/completion, text or messages (message lists rendered with the chat "
                          "template); may contain {iteration}. For strategies that generate: "
                          "labeled data for iteration 0."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training rows from a dataset instead of --train_file, read with datasets.load_dataset: a "
                          "dataset directory (save_to_disk output, or a folder of json/parquet files), a data file, or "
                          "a Hub id (under HF_HUB_OFFLINE=1 from the local cache only). Same row shapes as --train_file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration (subset) name."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to train on."})
    eval_file: str | None = field(default=None, metadata={"help": "JSONL for the held-out loss (may contain {iteration})."})
    iteration_init: str = field(
        default="previous",
        metadata={"help": "Start iteration K from iter_{K-1} (previous) or from the base model every time (base, "
                          "as ReST-EM does).", "choices": ["previous", "base"]},
    )
    max_seq_length: int = field(default=256, metadata={"help": "Truncate every training example (prompt + "
                                                           "completion) to this many tokens. Alias: --max_seq_length."})
    keep_iteration_checkpoints: bool = field(
        default=False, metadata={"help": "Move an iteration's trainer checkpoints into iter_K/ instead of deleting them."}
    )
    fsync: bool = field(default=True, metadata={"help": "fsync every file of an artifact before its manifest commits it."})
    async_commit: bool = field(
        default=True, metadata={"help": "Write checkpoint manifests (fsync + checksums) on a thread while training goes on."}
    )
    async_save: bool = field(
        default=False,
        metadata={"help": "Snapshot the training state into host memory at a save step and write HF's checkpoint files "
                          "(hashed while written, manifest last) on a thread while training goes on. Holds one extra "
                          "copy of weights + optimizer state in host memory while training."},
    )
    task: str | None = field(
        default=None, metadata={"help": "Built-in task providing data and metrics.", "choices": [None, "arithmetic"]}
    )


@dataclass
class GenerationArguments:
    _argument_group_name = "generation and reward (strategies that sample their own data)"

    prompts_file: str | None = field(
        default=None, metadata={"help": "JSONL prompt/answer to sample from (may contain {iteration})."}
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Completions sampled per prompt. "
                                                                  "Alias: --samples_per_prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens only (0: all)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per sample (at most). "
                                                             "Alias: --max_new_tokens."})
    generation_batch_size: int = field(default=64, metadata={"help": (
        "Samples (prompt, sample pairs) per generate() call, or per vLLM call; batches are formed over the whole "
        "work, so they do not depend on the number of ranks.")})
    reward_fn: str | None = field(
        default=None,
        # nargs: TRL's --reward_funcs takes several; one is kept as a string (the form itertrain.json has held)
        metadata={"help": "module:function: per sample (prompt, completion, answer) -> float, or batched in TRL's form "
                          "(prompts, completions, **kwargs) -> list[float] (default: exact match with the answer). "
                          "Several (grpo, rloo) are summed with --reward_weights. Alias: --reward_fn.", "nargs": "+"},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Score prompt+completion with this local AutoModelForSequenceClassification (one label), "
                          "batched and sharded over ranks (instead of --reward_fn)."},
    )
    reward_threshold: float = field(default=1.0, metadata={"help": "expert_iteration: keep samples with reward >= this."})
    data_policy: str = field(
        default="fresh",
        metadata={"help": "expert_iteration: train on this iteration's accepted data (fresh) or all so far (cumulative).",
                  "choices": ["fresh", "cumulative"]},
    )
    min_accepted: int = field(
        default=0,
        metadata={"help": "expert_iteration: stop (exit 1, before training) when an iteration's verifier kept fewer "
                          "distinct samples than this; the sampled data stays committed, so a relaunch with a lower "
                          "value trains on it (0: train on any number above 0)."},
    )
    eval_prompts_file: str | None = field(
        default=None,
        metadata={"help": "JSONL prompt rows (with the columns the reward needs) for a held-out evaluation of each "
                          "iteration's model: mean reward and pass@k, sampled as the strategies sample, scored by the "
                          "reward, committed with the iteration's metrics (heldout_*)."},
    )
    num_generations_eval: int = field(
        default=4, metadata={"help": "Completions sampled per held-out prompt (--eval_prompts_file): n of pass@k "
                                     "(TRL's name for the samples per prompt of an evaluation)."}
    )
    generation_backend: str = field(
        default="hf",
        metadata={"help": "What samples: Hugging Face generate() (hf) or a vLLM engine per rank (vllm; needs "
                          "`pip install itertrain[vllm]`).", "choices": ["hf", "vllm"]},
    )
    use_vllm: bool = field(default=False, metadata={"help": "TRL's name for --generation_backend vllm."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm: fraction of the GPU's memory the engine may take (TRL's default)."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "vllm: GPUs each engine splits the model over (each group of ranks runs one engine)."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "vllm: passed to the engine (itertrain releases it after every generate stage anyway)."}
    )

    @property
    def backend(self) -> str:
        """The generation backend, with TRL's --use_vllm as an alias of --generation_backend vllm."""
        return "vllm" if self.use_vllm else self.generation_backend


@dataclass
class LoraArguments:
    """LoRA with PEFT, under TRL's flag names and meanings (trl.ModelConfig); `--iteration_model` is itertrain's."""

    _argument_group_name = "LoRA (PEFT adapters instead of full fine-tuning; TRL's flag names)"

    use_peft: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights: checkpoints hold the adapter and its "
                          "optimizer state only. Needs `pip install itertrain[lora]`."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get an adapter: all-linear (every linear layer except the output layer), "
                          "module names (q_proj v_proj: every module whose name ends so), or one regular expression "
                          "matched against the full module path."},
    )
    iteration_model: str = field(
        default="merged",
        metadata={"help": "What iter_K holds under --use_peft: merged (a full model with the adapter merged in; "
                          "iteration K+1 trains a fresh adapter on it) or adapter (the adapter only, with a "
                          "fingerprinted reference to the base model; iteration K+1 continues the same adapter).",
                  "choices": ["merged", "adapter"]},
    )

    @property
    def mode(self) -> str | None:
        """The LoRA iteration-model mode, None without --use_peft."""
        return self.iteration_model if self.use_peft else None


@dataclass
class DistributedArguments:
    _argument_group_name = "preemption and distributed (torchrun)"

    preemption: bool = field(
        default=True,
        metadata={"help": "On SIGTERM or SIGUSR1 every rank agrees at the next step, a checkpoint is committed at "
                          "that step and the run exits 143 (outside training it stops at once, at the last committed "
                          "point). A second SIGTERM or SIGINT stops at once."},
    )
    preemption_grace_s: float = field(
        default=25.0,
        metadata={"help": "Seconds the preemption checkpoint may take; past them the run exits and the unfinished "
                          "checkpoint is never used. Keep it below the launcher's kill delay (torchrun, SLURM and "
                          "Kubernetes: 30 s)."},
    )
    dist_timeout_s: float = field(
        default=300.0,
        metadata={"help": "Process-group init and every training collective: a rank or node that does not answer "
                          "within this stops the run (replaces HF's --ddp_timeout, which itertrain does not use)."},
    )
    dist_io_timeout_s: float = field(
        default=1800.0,
        metadata={"help": "itertrain's own collectives, where the other ranks wait while rank 0 alone verifies, "
                          "writes or hashes an artifact."},
    )

    def __post_init__(self) -> None:
        from itertrain.errors import UsageError

        for name in ("preemption_grace_s", "dist_timeout_s", "dist_io_timeout_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name} {getattr(self, name)}: must be a positive number of seconds")


@dataclass
class RunConfig:
    """Everything one launch needs, parsed and validated."""

    model: ModelArguments
    loop: LoopArguments
    generation: GenerationArguments
    recovery: RecoveryArguments
    training: Any  # transformers.TrainingArguments, or the strategy's subclass of it (e.g. trl.DPOConfig)
    strategy_args: Any = None  # the strategy's own arguments dataclass, when it declares one
    argv: list[str] = field(default_factory=list)
    lora: LoraArguments = field(default_factory=LoraArguments)
    dist: DistributedArguments = field(default_factory=DistributedArguments)

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    def groups(self) -> list[Any]:
        """The argument dataclasses, itertrain's first."""
        extra = [self.strategy_args] if self.strategy_args is not None else []
        return [self.model, self.loop, self.generation, self.recovery, self.lora, self.dist, *extra, self.training]


ARGUMENT_GROUPS = (RecoveryArguments, ModelArguments, LoopArguments, GenerationArguments, LoraArguments,
                   DistributedArguments)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}
