"""What `--strategy grpo` and `--strategy rloo` share: online RL on TRL's GRPOTrainer / RLOOTrainer as iterations.

Iteration 0 is optional supervised fine-tuning on labeled data (`--sft_max_steps 0` skips it: iteration 0 is
then an RL iteration from the base model). Every RL iteration K trains from its starting model (iter_{K-1})
with TRL's trainer, which samples `--num_generations` completions per prompt inside training, scores them
with the reward functions (`--reward_funcs`, one or several, or exact match with the row's `answer`) and
takes a policy-gradient step with a KL penalty (`--beta`) against the reference model the plan names
(`--ref_model start`: iter_{K-1}; `base`), fingerprinted into the lineage as iterative DPO does.

Exact resume: TRL keeps a generation block's completions in memory (`_buffered_inputs`), which no checkpoint
holds. itertrain takes checkpoints only at generation-block boundaries (`save_step_multiple`; --save_steps
must be a multiple of the block, and a preemption stops at the next boundary), where that buffer is empty: a
resume then regenerates the next block from the restored RNG and data position exactly as the uninterrupted
run did. The design and its limits: docs/strategies/grpo.md.

With `--task` (a task with a curriculum) and no `--prompts_file`, an RL iteration's prompts come from the task's
adaptive curriculum, as expert iteration's do: the iteration's starting model (the plan's source, never a
checkpoint) is probed with the iteration's seeds, once per launch, as the iteration's training starts; the decision
is printed, recorded in the iteration's lineage and metrics, and covered by the data fingerprint (a relaunch after
a kill probes the same model with the same seeds, so it decides the same; one that decides otherwise is refused).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from itertrain import data_lineage, distributed
from itertrain.args import reward_specs
from itertrain.errors import RecoveryRefused, TrainingFailed, UsageError
from itertrain.rewards import RewardFunction, Rewards, check_reward, load_reward_fn, plain
from itertrain.strategies.base import Evaluation, ModelSource, Strategy
from itertrain.strategies.expert_iteration import SampledDataStrategy
from itertrain.strategies.reference import check_reference, reference, reference_lineage
from itertrain.strategies.sft import SFTStrategy

PROMPT_ONLY = (("prompt",),)
# TRL's per-iteration metrics worth keeping (means over the iteration's logged steps): the reward (and per
# reward function), its spread, the share of groups with all-equal rewards, KL, completion length, clipping.
KEPT = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
        "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean")


class CurriculumPending(TrainingFailed):
    """An RL iteration's curriculum rows were asked for before its starting model was probed (at launch, on rank 0
    only, where the probe cannot run): the data fingerprint is then compared once the probe decided."""


def _kept(key: str) -> bool:
    return key in KEPT or (key.startswith("rewards/") and key.endswith("/mean"))


@dataclass
class OnlineRLArguments:
    _argument_group_name = "grpo / rloo"

    ref_model: str = field(
        default="start",
        metadata={"help": "KL reference of each RL iteration: its starting model (start: iter_{K-1}, or the base model "
                          "under --iteration_init base) or the base model (base).", "choices": ["start", "base"]},
    )
    sft_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the SFT iteration 0 (default: --learning_rate)."}
    )
    sft_max_steps: int | None = field(
        default=None, metadata={"help": "--max_steps of the SFT iteration 0; 0 skips it (iteration 0 is RL)."}
    )


class TRLReward:
    """An itertrain reward function (either form) as TRL's trainers call it: batched, all by keyword. The
    BOS text itertrain puts in front of each prompt is taken off again before the function sees it."""

    def __init__(self, fn: RewardFunction, bos: str):
        self.fn, self.bos = fn, bos
        self.__name__ = fn.spec.rpartition(":")[2].rpartition(".")[2] or fn.spec  # TRL's metric name

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        prompts = [p[len(self.bos):] if self.bos and p.startswith(self.bos) else p for p in prompts]
        if self.fn.batched:
            values = list(self.fn.fn(prompts=prompts, completions=completions, **kwargs))
        else:
            answers = kwargs.get("answer") or [None] * len(prompts)
            values = [self.fn.fn(prompt=p, completion=c, answer=a) for p, c, a in zip(prompts, completions, answers)]
        return [None if v is None else float(plain(v)) for v in values]


def generation_block(args: Any) -> int:
    """Optimizer steps per generation block: TRL generates once per steps_per_generation × num_iterations
    micro-batches, and an optimizer step takes gradient_accumulation_steps of them."""
    micro = (args.steps_per_generation or args.gradient_accumulation_steps) * max(int(args.num_iterations), 1)
    ga = args.gradient_accumulation_steps
    return micro * ga // math.gcd(micro, ga) // ga


# TRL's settings that shape every step of an RL iteration: a resume inside an iteration must train with the
# values its first steps had, or the iteration model mixes two settings (recorded in the lineage).
RL_SETTINGS = ("num_generations", "beta", "loss_type", "max_completion_length", "temperature", "top_p", "top_k",
               "epsilon", "epsilon_high", "scale_rewards", "reward_weights")


def rl_settings(args: Any) -> dict[str, Any]:
    """The values of RL_SETTINGS that this TRL config has (RLOO's lacks some of GRPO's)."""
    return {name: getattr(args, name) for name in RL_SETTINGS if hasattr(args, name)}


def changed_rl_settings(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`--flag old -> new` for each setting recorded at the iteration's start that this launch changes."""
    return [f"--{k} {recorded[k]} -> {now[k]}" for k in sorted(recorded.keys() & now.keys()) if recorded[k] != now[k]]


def recorded_total_steps(checkpoint: Any) -> int | None:
    """The iteration's total optimizer steps as the checkpoint's trainer state records it (HF computes it for
    epoch-based runs, where --max_steps is -1); None when unreadable."""
    import json

    try:
        value = json.loads((checkpoint / "trainer_state.json").read_text()).get("max_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_generation_batch(args: Any) -> None:
    """TRL's rule, explained with the flags that make the batch (before TRL's own, terser ValueError)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spg = args.steps_per_generation or (None if args.generation_batch_size else args.gradient_accumulation_steps)
    batch = args.generation_batch_size or args.per_device_train_batch_size * world * spg
    n = args.num_generations
    if n is not None and n < 2:
        method = "RLOO" if "RLOO" in type(args).__name__ else "GRPO"
        raise UsageError(f"--num_generations {n}: {method} compares each completion's reward with the others of its "
                         "prompt's group, so it needs at least 2 completions per prompt: use --num_generations 2 or more")
    if n is not None and batch % n:
        made = "--generation_batch_size" if args.generation_batch_size else (
            f"--per_device_train_batch_size {args.per_device_train_batch_size} × {world} process(es) × "
            f"--steps_per_generation {spg}")
        raise UsageError(
            f"--num_generations {n} does not divide the generation batch of {batch} completions ({made}): TRL "
            f"samples whole groups of --num_generations completions per prompt into each generation batch, so the "
            f"batch must be a multiple of it. Choose --num_generations dividing {batch}, or change the batch")


def kept_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Means of TRL's kept training metrics over an iteration's log entries (None and NaN left out)."""
    sums: dict[str, list[float]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if _kept(key) and isinstance(value, (int, float)) and math.isfinite(value):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sorted(sums.items())}


class OnlineRLStrategy(SampledDataStrategy):
    """GRPO and RLOO: a subclass names TRL's trainer (`rl_trainer_class`) and config (`training_arguments_class`)."""

    defining_fields = ("prompts_file", "reward_fn", "ref_model")
    arguments_class = OnlineRLArguments
    method: ClassVar[str] = "GRPO"
    rl_trainer_class: ClassVar[type | None] = None  # TRL's trainer, with the plan's reference (grpo.py)
    # TRL's config fields that itertrain already has a flag for, under TRL's name as an alias.
    training_from = {"num_generations": "generation.samples_per_prompt",
                     "max_completion_length": "generation.max_new_tokens", "temperature": "generation.temperature",
                     "top_p": "generation.top_p", "top_k": "generation.top_k"}

    @classmethod
    def check_unsupported(cls, cfg) -> None:
        gen = cfg.generation
        if gen.reward_model or gen.backend == "vllm":
            raise UsageError(f"--strategy {cls.name} samples inside TRL's trainer with HF generate(): "
                             f"{'--reward_model' if gen.reward_model else '--generation_backend vllm'} is not "
                             "supported by it; pass reward functions (--reward_funcs module:function ...)")

    @classmethod
    def check_arguments(cls, cfg) -> None:
        loop, gen, t, rl = cfg.loop, cfg.generation, cfg.training, cfg.strategy_args
        sft = rl.sft_max_steps != 0
        if not loop.task and not (gen.prompts_file and (loop.train_file or not sft)):
            raise UsageError(f"--strategy {cls.name} needs --task arithmetic, or --prompts_file (prompt rows, with any "
                             "columns the reward functions read) and --train_file (labeled data for the SFT iteration "
                             "0; --sft_max_steps 0 skips it)")
        if t.sync_ref_model:
            raise UsageError(f"--sync_ref_model is not supported by {cls.name}: the synced reference would not be in "
                             "the checkpoints; each iteration's reference is its starting model or the base model")
        if cfg.lora.use_peft and (cfg.lora.iteration_model != "merged" or rl.ref_model == "base"):
            raise UsageError(f"--strategy {cls.name} with --use_peft needs --iteration_model merged and --ref_model "
                             "start: TRL's reference is then the adapter switched off, which is iter_{K-1} exactly")
        funcs = reward_specs(gen.reward_fn) or ["exact match"]
        if t.reward_weights is not None and len(t.reward_weights) != len(funcs):
            raise UsageError(f"--reward_weights has {len(t.reward_weights)} value(s) for {len(funcs)} reward "
                             f"function(s) ({', '.join(funcs)}): give one weight per function of --reward_funcs")
        block = generation_block(t)
        if t.save_strategy != "no" and (t.save_strategy != "steps" or t.save_steps != int(t.save_steps)
                                        or int(t.save_steps) % block):
            save = str(getattr(t.save_strategy, "value", t.save_strategy))  # the value typed, not the enum
            raise UsageError(
                f"--save_strategy {save}{f' --save_steps {t.save_steps}' if save == 'steps' else ''}: {cls.name} generates once per "
                f"generation block of {block} optimizer step(s) (--steps_per_generation), and keeps the block's "
                "completions in memory only; checkpoints are taken at block boundaries so that a resume regenerates "
                f"the block exactly. Use --save_strategy steps with --save_steps a multiple of {block}")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self._decided: dict[int, tuple[tuple[str, str | None], list[dict[str, Any]], dict[str, Any]]] = {}
        self._restored: dict[int, tuple[dict[str, Any] | None, str]] = {}  # rank 0: the checkpoint's data entry
        self._fixed_schedule = False  # preflight reads the task's fixed schedule (no model is loaded yet)

    @property
    def rl_args(self) -> OnlineRLArguments:
        return self.ctx.cfg.strategy_args

    def is_rl(self, iteration: int) -> bool:
        """Whether `iteration` trains with TRL's RL trainer (else it is the SFT iteration 0)."""
        return iteration > 0 or self.rl_args.sft_max_steps == 0

    def generates(self, iteration: int) -> bool:
        return False  # TRL's trainer samples inside training

    def uses_curriculum(self, iteration: int) -> bool:
        """Whether RL iteration `iteration`'s prompts come from the task's curriculum (--task, no --prompts_file)."""
        cfg = self.ctx.cfg
        return (self.is_rl(iteration) and bool(cfg.loop.task) and not cfg.generation.prompts_file
                and hasattr(self.task(), "curriculum"))

    def decide(self, iteration: int, source: ModelSource) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The curriculum's rows and decision for `iteration`, probed on `source` (its starting model) on every
        rank, once per launch: preflight, the data fingerprint and the dataset all read the same rows."""
        key = (source.path, source.fingerprint)
        cached = self._decided.get(iteration)
        if cached is None or cached[0] != key:
            rows, decided = self.iteration_prompts(iteration, source)
            distributed.run_on_main(self._check_decision, iteration, rows, decided)
            self._decided[iteration] = cached = (key, rows, decided)
        return cached[1], cached[2]

    def _check_decision(self, iteration: int, rows: list[dict[str, Any]], decided: dict[str, Any]) -> None:
        """Rank 0, when this launch continues a checkpoint of `iteration`: refuse rows other than those it was
        trained on (the launch's own data check could not see them: they exist once the probe ran)."""
        recorded, checkpoint = self._restored.pop(iteration, (None, ""))
        now = {"source": self.rows_source(iteration), "fingerprint": data_lineage.rows_fingerprint(rows)}
        what = data_lineage.changed(recorded, now)
        if what is None:
            return
        from itertrain.tasks.curriculum import describe

        if not self.ctx.cfg.recovery.allow_config_change:
            raise RecoveryRefused(
                f"{checkpoint} of iteration {iteration} cannot be continued: the curriculum now picks other prompts "
                f"({describe(decided['curriculum'])}), {what}. Restart iteration {iteration} from its starting model "
                "(--resume_from none --resume_from_iteration auto), or pass --allow_config_change to continue on them")
        print(f"   ⚠️  {what} (continuing {checkpoint} on the new data, allowed by --allow_config_change)", flush=True)

    def probe_score(self, rows: list[dict[str, Any]], completions: list[list[str]]) -> Rewards:
        """The task's own verifier (exact match) decides the pass rates, whatever --reward_funcs trains on."""
        return distributed.run_on_main(load_reward_fn(None).score, rows, completions, self.ctx.tokenizer)

    def probe_threshold(self) -> float:
        """Exact match's reward for a right answer: --reward_threshold (expert iteration's filter) does not apply."""
        return 1.0

    # ---- data and rewards ----------------------------------------------------------------------------------
    def reward_functions(self) -> list[RewardFunction]:
        specs = reward_specs(self.ctx.cfg.generation.reward_fn) or [None]
        return [load_reward_fn(spec) for spec in specs]

    def preflight(self, iteration: int) -> None:
        """The rows of `iteration` (labeled for SFT, prompt-only for RL) and every reward function, tried on
        the first prompt rows of the first RL iteration of this launch (`check_reward`)."""
        self._fixed_schedule = True  # a curriculum's rows wait for the probe: check the task's rows of this shape
        try:
            Strategy.preflight(self, iteration)
        finally:
            self._fixed_schedule = False
        later = [k for k in range(iteration, self.ctx.cfg.loop.num_iterations) if self.is_rl(k)]
        if later:
            rows = self.prompt_rows(later[0])
            for fn in self.reward_functions():  # groups of completions, as TRL calls it: a wrong length shows
                check_reward(fn, rows, self.ctx.tokenizer, self.ctx.cfg.training.num_generations)

    def row_shapes(self, iteration: int) -> tuple[tuple[str, ...], ...]:
        return PROMPT_ONLY if self.is_rl(iteration) else super().row_shapes(iteration)

    def rows_source(self, iteration: int) -> str:
        if not self.is_rl(iteration):
            return SFTStrategy.rows_source(self, iteration)
        gen = self.ctx.cfg.generation
        return gen.prompts_file or f"task {self.ctx.cfg.loop.task}"

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        if not self.is_rl(iteration):
            return self.labeled_rows()
        if self._fixed_schedule or not self.uses_curriculum(iteration):
            return self.prompt_rows(iteration)
        if iteration not in self._decided:
            raise CurriculumPending(f"iteration {iteration}'s prompts are decided by probing its starting model")
        return self._decided[iteration][1]

    def bos_text(self) -> str:
        """BOS as text in front of each prompt when the tokenizer does not add it (TRL tokenizes with the
        tokenizer's defaults; itertrain's sequences start with BOS, as in SFT and generation)."""
        tokenizer = self.ctx.tokenizer
        ids = tokenizer("0")["input_ids"]
        adds = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        return tokenizer.bos_token if tokenizer.bos_token and not adds else ""

    def train_dataset(self, iteration: int) -> Any:
        if not self.is_rl(iteration):
            return super().train_dataset(iteration)
        from datasets import Dataset

        bos = self.bos_text()
        return Dataset.from_list([{**row, "prompt": bos + row["prompt"]} for row in self.train_rows(iteration)])

    def evaluation(self, iteration: int) -> Evaluation | None:
        return None if self.is_rl(iteration) else super().evaluation(iteration)

    # ---- training ------------------------------------------------------------------------------------------
    def trainer_class(self) -> type:
        """TRL's RL trainer the subclass names (`rl_trainer_class`)."""
        return self.rl_trainer_class or super().trainer_class()

    def trainer_class_for(self, iteration: int) -> type:
        from transformers import Trainer

        return self.trainer_class() if self.is_rl(iteration) else Trainer

    def training_arguments(self, iteration: int, args: Any) -> Any:
        if not self.is_rl(iteration):
            if self.rl_args.sft_learning_rate is not None:
                args.learning_rate = self.rl_args.sft_learning_rate
            if self.rl_args.sft_max_steps is not None:
                args.max_steps = self.rl_args.sft_max_steps
        return args

    def trainer_kwargs_for(self, iteration: int, model: Any, args: Any, source: ModelSource) -> dict[str, Any]:
        if not self.is_rl(iteration):
            return super().trainer_kwargs_for(iteration, model, args, source)
        funcs = [TRLReward(fn, self.bos_text()) for fn in self.reward_functions()]
        return {"reward_funcs": funcs, "processing_class": self.ctx.tokenizer,
                "itertrain_reference": str(reference(self.ctx, self.rl_args.ref_model, source, iteration)[2])}

    def save_step_multiple(self, iteration: int, args: Any) -> int:
        return generation_block(args) if self.is_rl(iteration) else 1

    def iteration_lineage(self, iteration: int, source: ModelSource) -> dict[str, Any]:
        if not self.is_rl(iteration):
            return {}
        decided = self.decide(iteration, source)[1] if self.uses_curriculum(iteration) else {}
        return {**reference_lineage(self.ctx, self.rl_args.ref_model, source, iteration),
                "rl_settings": rl_settings(self.ctx.cfg.training), **decided}

    def check_restored(self, iteration: int, source: ModelSource, lineage: dict[str, Any], checkpoint: str) -> None:
        """The reference and TRL's RL settings must be those the checkpoint was trained with, and the checkpoint
        at a boundary of this launch's generation blocks (a changed --steps_per_generation could put it inside
        one)."""
        if not self.is_rl(iteration):
            return
        self._restored[iteration] = (lineage.get(data_lineage.KEY), os.path.basename(str(checkpoint)))
        check_reference(self.ctx, self.rl_args.ref_model, source, iteration, lineage, checkpoint, self.method)
        name = os.path.basename(str(checkpoint))
        changed = changed_rl_settings(lineage.get("rl_settings") or {}, rl_settings(self.ctx.cfg.training))
        start = f"iter_{iteration - 1}" if iteration else "the base model"
        if changed:
            raise RecoveryRefused(
                f"{name} of iteration {iteration} was trained with other {self.method} settings than this launch's "
                f"({'; '.join(changed)}): continuing it would mix two settings in one iteration model. Relaunch "
                f"with the values it was trained with, or restart iteration {iteration} from {start} with the new ones "
                "(--resume_from none --resume_from_iteration auto)")
        self._check_block(iteration, name, self.ctx.root / checkpoint)

    def _check_block(self, iteration: int, name: str, checkpoint: Any) -> None:
        """Refuse a checkpoint inside a generation block of this launch, unless it is the iteration's last step."""
        t = self.ctx.cfg.training
        step = int(name.rpartition("-")[2]) if name.rpartition("-")[2].isdigit() else 0
        block = generation_block(t)
        total = t.max_steps if t.max_steps > 0 else recorded_total_steps(checkpoint)
        if step % block and (total is None or step < total):
            raise RecoveryRefused(
                f"{name} of iteration {iteration} is at step {step}, inside a generation block of {block} step(s) "
                f"under this launch's --steps_per_generation {t.steps_per_generation}: a resume there cannot "
                f"regenerate the block as the run had it. Relaunch with the --steps_per_generation and "
                f"--gradient_accumulation_steps it was trained with, or restart iteration {iteration} "
                "(--resume_from none --resume_from_iteration auto)")

    def training_metrics(self, iteration: int, state: Any) -> dict[str, Any]:
        """TRL's reward, KL, completion length and clipping metrics, averaged over the iteration's logged steps,
        and the curriculum's decision; a warning naming the iteration when every group's rewards were equal."""
        if not self.is_rl(iteration):
            return {}
        metrics: dict[str, Any] = kept_metrics(state.log_history)
        if iteration in self._decided:
            metrics.update(self._decided[iteration][2])
        if metrics.get("frac_reward_zero_std") == 1.0 and distributed.is_main():
            print(f"⚠️  iteration {iteration}: every prompt's {self.ctx.cfg.generation.samples_per_prompt} completions "
                  f"got the same reward, so every advantage was zero and {self.method} learned nothing from the "
                  "rewards (frac_reward_zero_std = 1.0 in runs/metrics.jsonl). Use a reward that tells completions "
                  "apart (partial credit), raise --temperature or --num_generations", flush=True)
        return metrics
