"""`--strategy iterative_dpo`: online / iterative DPO (RLHFlow, Self-Rewarding style) on TRL's DPOTrainer.

Iteration 0 is supervised fine-tuning on labeled data, as in expert iteration. Every later iteration K:
generate (sample --num_generations completions per prompt from the previous iteration's model, with
expert iteration's per-sample seeds) -> score (exact match, --reward_funcs or --reward_model) -> pair (per
prompt: chosen = the highest reward, rejected = the lowest; no pair when the margin is below
--min_reward_margin or zero) -> commit data/iter_K (samples.jsonl, pairs.jsonl, stats.json, and the
lineage of the model that produced them) -> train with TRL's DPOTrainer behind itertrain's recovery
hooks -> evaluate -> commit. DPO's own flags (--beta, --loss_type, --max_length, ...) are TRL's
DPOConfig fields under TRL's names.

The reference model is the iteration's starting model (the previous iteration's model; the base model
under --iteration_init base), or the base model with --ref_model base. It is not in the checkpoints:
each iteration records its fingerprint in the lineage of its checkpoints, and a launch that resumes one
reloads the reference from its source and refuses (exit 2) when the fingerprint differs.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itertrain.errors import UsageError

MIN_TRL = "1.16"
try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as e:
    raise UsageError("--strategy iterative_dpo trains with TRL, an optional dependency that is not installed: "
                     "pip install 'itertrain[dpo]'"
                     + (f" (TRL {MIN_TRL} needs Python >= 3.11)" if sys.version_info < (3, 11) else "")) from e

from packaging.version import Version  # noqa: E402 - after the check that names the missing dependency

if Version(trl.__version__) < Version(MIN_TRL):
    raise UsageError(f"--strategy iterative_dpo needs trl>={MIN_TRL}, found {trl.__version__}: "
                     "pip install -U 'itertrain[dpo]'")

from itertrain.chat import as_completion, explicit_prompt, render  # noqa: E402
from itertrain.data import read_jsonl, resolve_path  # noqa: E402
from itertrain.errors import TrainingFailed  # noqa: E402
from itertrain.layout import data_name  # noqa: E402
from itertrain.rewards import Rewards, why_no_pairs  # noqa: E402
from itertrain.strategies.base import Evaluation, ModelSource  # noqa: E402
from itertrain.strategies.expert_iteration import SAMPLES, IterationZeroArguments, SampledDataStrategy  # noqa: E402
from itertrain.strategies.reference import check_reference, reference, reference_lineage  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers report usage unless told not to
PAIRS = "pairs.jsonl"
EVAL_PAIRS = 128  # without a preference --eval_file, DPO's metrics are reported on this many of the iteration's pairs
# DPO's evaluation metrics worth keeping per iteration (the rest stay in the TensorBoard logs).
_KEPT_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                 "logps/chosen", "logps/rejected")


@dataclass
class DPOArguments(IterationZeroArguments):
    _argument_group_name = "iterative_dpo"

    ref_model: str = field(
        default="start",
        metadata={"help": "Reference model of each DPO iteration: its starting model (start: the previous iteration's "
                          "model, or the base model under --iteration_init base) or the base model (base).",
                  "choices": ["start", "base"]},
    )
    min_reward_margin: float = field(
        default=0.1,
        metadata={"help": "A prompt gives a pair only when its best and worst sample's rewards differ by at least this "
                          "(and by more than 0)."},
    )
    min_pairs: int = field(
        default=0,
        metadata={"help": "Stop (exit 1, before training) when an iteration's samples give fewer preference pairs than "
                          "this; the sampled data stays committed, so a relaunch with a lower value trains on it "
                          "(0: train on any number above 0)."},
    )


def make_pairs(rows: list[dict[str, Any]], completions: list[list[str]], rewards: Rewards,
               min_margin: float) -> list[dict[str, Any]]:
    """Per prompt: chosen = the highest reward, rejected = the lowest (the first sample of each on ties;
    unscored samples are left out); no pair when the margin is below `min_margin` or zero."""
    pairs = []
    for i, (row, outs, rs) in enumerate(zip(rows, completions, rewards)):
        scored = [(r, s) for s, r in enumerate(rs) if r is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda t: (t[0], -t[1]))
        worst = min(scored, key=lambda t: (t[0], t[1]))
        margin = best[0] - worst[0]
        if margin <= 0 or margin < min_margin or outs[best[1]] == outs[worst[1]]:
            continue
        chosen, rejected = (as_completion(row["prompt"], outs[s]) for s in (best[1], worst[1]))
        pairs.append({"example": i, "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_reward": best[0], "rejected_reward": worst[0], "margin": margin})
    return pairs


def pair_stats(rows: list[dict[str, Any]], rewards: Rewards, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for rs in rewards for r in rs if r is not None]
    return {"samples": sum(map(len, rewards)), "prompts": len(rows), "pairs": len(pairs),
            "pair_rate": len(pairs) / max(len(rows), 1), "mean_reward": sum(scored) / max(len(scored), 1),
            "mean_margin": sum(p["margin"] for p in pairs) / max(len(pairs), 1)}


def dpo_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """DPOTrainer.evaluate's metrics under `prefix`. TRL names its own metrics `eval_*` whatever the prefix;
    only the loss and the preference metrics are kept (`num_tokens` counts training tokens, and restarts
    from 0 after a resume)."""
    out = {}
    for key, value in metrics.items():
        name = key.removeprefix(prefix + "_") if key.startswith(prefix + "_") else key.removeprefix("eval_")
        if name in _KEPT_METRICS:
            out[f"{prefix}_{name}"] = value
    return out


class ItertrainDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer as itertrain runs it (itertrain puts its RecoveryHooks in front)."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a model card README.md into output_dir at every save: the experiment root is itertrain's."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        return dpo_metrics(super().evaluate(eval_dataset, ignore_keys, metric_key_prefix), metric_key_prefix)


def _quiet() -> None:
    """Per-rank noise of TRL's data preparation and a deprecation inside TRL (NOTES: one line per rank each)."""
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def _is_pair(row: dict[str, Any]) -> bool:
    return {"prompt", "chosen", "rejected"} <= row.keys()


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front by itself (TRL tokenizes with the tokenizer's defaults)."""
    ids = tokenizer("0")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


class IterativeDPOStrategy(SampledDataStrategy):
    name = "iterative_dpo"
    defining_fields = ("prompts_file", "reward_fn", "reward_model", "ref_model")
    arguments_class = DPOArguments
    training_arguments_class = DPOConfig
    # TRL's DPO defaults for the learning rate and logging; bf16 and activation checkpointing, which
    # DPOConfig turns on, stay off as everywhere in itertrain (--bf16 true, --activation_checkpointing true).
    training_defaults = {"learning_rate": 1e-6, "logging_steps": 10}

    @classmethod
    def check_arguments(cls, cfg) -> None:
        super().check_arguments(cfg)
        t = cfg.training
        if cfg.strategy_args.min_pairs < 0:
            raise UsageError(f"--min_pairs {cfg.strategy_args.min_pairs}: must be 0 (off) or a positive number of pairs")
        # Both would hold reference state outside the checkpoints: a resume could not restore it.
        if t.precompute_ref_log_probs:
            raise UsageError("--precompute_ref_log_probs is not supported by iterative_dpo: the reference log-probs "
                             "would live in a per-process cache outside the checkpoints (and TRL's cache breaks with "
                             "more than one rank); the reference model runs alongside instead")
        if t.sync_ref_model:
            raise UsageError("--sync_ref_model is not supported by iterative_dpo: the synced reference would not be in "
                             "the checkpoints, so a resume could not restore it; each iteration's reference is its "
                             "starting model (--ref_model start) or the base model (--ref_model base)")

    @property
    def dpo(self) -> DPOArguments:
        return self.ctx.cfg.strategy_args

    # ---- data -------------------------------------------------------------------------------------------
    def settings(self, iteration: int) -> dict[str, Any]:
        return {**super().settings(iteration), "min_reward_margin": self.dpo.min_reward_margin}

    def select_and_commit(self, iteration: int, rows, completions, rewards: Rewards, source: ModelSource,
                          decided: dict[str, Any]) -> dict[str, Any]:
        pairs = make_pairs(rows, completions, rewards, self.dpo.min_reward_margin)
        stats = {**pair_stats(rows, rewards, pairs), **decided}
        self.commit(iteration, {SAMPLES: self.sample_rows(rows, completions, rewards), PAIRS: pairs}, stats, source)
        print(f"   📦 {data_name(iteration)}: {stats['samples']} samples, mean reward {stats['mean_reward']:.3f}; "
              f"{len(pairs)} of {len(rows)} prompts give a pair (margin >= {self.dpo.min_reward_margin})", flush=True)
        return stats

    def rows_source(self, iteration: int) -> str:
        return super().rows_source(0) if iteration == 0 else str(self.data_dir(iteration) / PAIRS)

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        """Iteration 0: labeled prompt/completion rows; later: this iteration's preference pairs."""
        if iteration == 0:
            return self.labeled_rows()
        pairs = read_jsonl(self.data_dir(iteration) / PAIRS)
        if not pairs:
            why, advice = why_no_pairs(read_jsonl(self.data_dir(iteration) / SAMPLES), self.dpo.min_reward_margin)
            raise TrainingFailed(
                f"iteration {iteration}: no prompt gave a preference pair ({why}), so there is nothing to train on. "
                f"{advice}; the samples are in {self.data_dir(iteration) / SAMPLES}")
        if len(pairs) < self.dpo.min_pairs:
            raise TrainingFailed(
                f"iteration {iteration}: the samples gave {len(pairs)} preference pairs, fewer than --min_pairs "
                f"{self.dpo.min_pairs}, so the run stops before training on them. {data_name(iteration)} stays "
                f"committed: relaunch with --min_pairs {len(pairs)} (or lower) and --resume_from auto "
                "--resume_from_iteration auto to train on it, or raise --num_generations or --temperature, or "
                f"lower --min_reward_margin, to sample again; the pairs are in {self.data_dir(iteration) / PAIRS}")
        return pairs

    def preference_dataset(self, pairs: list[dict[str, Any]]) -> Any:
        """TRL's standard explicit-prompt format. itertrain's sequences start with BOS (as in SFT and
        generation); TRL tokenizes with the tokenizer's defaults, so BOS goes into the prompt text when
        the tokenizer does not add it itself (nor the chat template). Conversational pairs are rendered here with
        TRL's own `apply_chat_template`, so that the prompt is the text generation sampled from."""
        from datasets import Dataset

        tokenizer = self.ctx.tokenizer
        bos = tokenizer.bos_token if tokenizer.bos_token and not adds_bos(tokenizer) else ""
        rows = [render({k: p[k] for k in ("prompt", "chosen", "rejected")}, tokenizer) for p in map(explicit_prompt, pairs)]
        return Dataset.from_list([{"prompt": ("" if r["prompt"].startswith(bos) else bos) + r["prompt"],
                                   "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        rows = super().eval_rows(iteration)
        rows = [explicit_prompt(r) for r in rows] if rows else rows
        if rows and all(_is_pair(r) for r in rows):  # a preference --eval_file: the SFT loss is on its chosen answers
            return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        return rows

    def train_dataset(self, iteration: int) -> Any:
        if iteration == 0:
            return super().train_dataset(0)
        return self.preference_dataset(self.train_rows(iteration))

    def eval_dataset(self, iteration: int) -> Any:
        if iteration == 0:
            return super().eval_dataset(0)
        found = self.evaluation(iteration)
        return found.dataset if found is not None else None

    def evaluation(self, iteration: int) -> Evaluation | None:
        """Iteration 0: the SFT eval loss. DPO iterations: DPO's metrics on the --eval_file rows when they
        are preference pairs (eval_*), else on up to 128 of the iteration's own pairs (eval_train_*)."""
        if iteration == 0:
            dataset = super().eval_dataset(0)
            return Evaluation(dataset, "eval") if dataset is not None else None
        loop = self.ctx.cfg.loop
        rows = [explicit_prompt(r) for r in read_jsonl(resolve_path(loop.eval_file, iteration))] if loop.eval_file else []
        if rows and all(_is_pair(r) for r in rows):
            return Evaluation(self.preference_dataset(rows), "eval")
        return Evaluation(self.preference_dataset(self.train_rows(iteration)[:EVAL_PAIRS]), "eval_train")

    # ---- training ------------------------------------------------------------------------------------------
    def trainer_class(self) -> type:
        return ItertrainDPOTrainer

    def trainer_class_for(self, iteration: int) -> type:
        return super().trainer_class() if iteration == 0 else self.trainer_class()

    def trainer_kwargs_for(self, iteration: int, model: Any, args: Any, source: ModelSource) -> dict[str, Any]:
        if iteration == 0:
            return super().trainer_kwargs_for(iteration, model, args, source)
        _quiet()
        from itertrain.lora.model import load_iteration_model

        # Always an explicit instance loaded from the reference's source: with ref_model=None TRL would
        # reload model.config._name_or_path, which is the checkpoint after a resume, not the reference
        # (and, under --use_peft, use the policy with its adapter disabled: the base, not iter_{K-1}).
        # An adapter-only iter_{K-1} is the base with that adapter, merged: the reference is frozen, and
        # TRL patches the reference's forward for a plain causal LM (a PeftModel breaks it).
        ref = load_iteration_model(self.reference(source)[2], self.ctx.cfg)
        if hasattr(ref, "merge_and_unload"):
            ref = ref.merge_and_unload()
        return {"ref_model": ref, "processing_class": self.ctx.tokenizer}

    # ---- the reference model -------------------------------------------------------------------------------
    def reference(self, source: ModelSource) -> tuple[str, str | None, Path]:
        """(name, fingerprint, directory) of the reference model of an iteration whose previous model is `source`."""
        return reference(self.ctx, self.dpo.ref_model, source)

    def iteration_lineage(self, iteration: int, source: ModelSource) -> dict[str, Any]:
        return {} if iteration == 0 else reference_lineage(self.ctx, self.dpo.ref_model, source)

    def check_restored(self, iteration: int, source: ModelSource, lineage: dict[str, Any], checkpoint: str) -> None:
        if iteration > 0:  # iteration 0 is SFT: no reference
            check_reference(self.ctx, self.dpo.ref_model, source, iteration, lineage, checkpoint, "DPO")
