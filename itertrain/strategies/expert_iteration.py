"""`--strategy expert_iteration`: rejection-sampling fine-tuning (STaR / ReST-EM style).

Iteration 0 is supervised fine-tuning on labeled data. Every later iteration K:
generate (sample --num_generations completions per prompt from the previous iteration's model, as
the recovery plan names it) -> score (exact match with the reference answer, or --reward_funcs) ->
filter (keep reward >= threshold, dedupe) -> commit data/iter_K/ -> train on it
(--data_policy fresh|cumulative).

The committed data records which model produced it (its fingerprint) and the sampling settings; a
relaunch reuses it only when both match, so the data can never silently come from the wrong model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itertrain import chat, distributed
from itertrain.artifacts.manifest import ManifestError, fingerprint, read_manifest
from itertrain.data import read_jsonl, resolve_path, write_jsonl
from itertrain.errors import TrainingFailed, UsageError
from itertrain.generation import Sampling, backend_record, engine_model_for, generate
from itertrain.layout import data_name
from itertrain.recovery.flags import BASE
from itertrain.rewards import RewardFunction, RewardModel, Rewards, check_reward, reward_scorer
from itertrain.strategies.base import ModelSource
from itertrain.strategies.sft import SFTStrategy

ACCEPTED = "accepted.jsonl"
SAMPLES = "samples.jsonl"
STATS = "stats.json"
LOW_ACCEPTANCE = 0.01  # below this share of samples passing, a run without --min_accepted is warned


@dataclass
class IterationZeroArguments:
    """Flags of the supervised iteration 0 of a strategy whose later iterations learn from sampled data."""

    _argument_group_name = "expert_iteration"

    sft_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the SFT iteration 0 (unset: --learning_rate)."}
    )
    sft_max_steps: int | None = field(
        default=None, metadata={"help": "--max_steps of the SFT iteration 0 (unset: --max_steps)."}
    )


class SampledDataStrategy(SFTStrategy):
    """Shared by the strategies that sample their own data from the previous model: prompts, the
    data directory, the reuse rule for committed data, sampling and scoring. Subclasses turn scored
    samples into training data and commit it (`select_and_commit`)."""

    defining_fields = ("prompts_file", "reward_fn", "reward_model")

    @classmethod
    def check_arguments(cls, cfg) -> None:
        loop, gen = cfg.loop, cfg.generation
        if not loop.task and not (gen.prompts_file and (loop.train_file or loop.dataset_name)):
            raise UsageError(
                f"--strategy {cls.name} needs --task arithmetic, or --train_file or --dataset_name (labeled data for "
                "iteration 0) and --prompts_file (prompt/answer JSONL to sample from)"
            )
        if gen.samples_per_prompt < 1 or gen.generation_batch_size < 1 or gen.max_new_tokens < 1:
            raise UsageError("--num_generations, --generation_batch_size and --max_completion_length must be at least 1")
        if gen.min_accepted < 0:
            raise UsageError(f"--min_accepted {gen.min_accepted}: must be 0 (off) or a positive number of samples")

    def generates(self, iteration: int) -> bool:
        return iteration > 0  # iteration 0 learns from labeled data

    def preflight(self, iteration: int) -> None:
        """Labeled data of an SFT iteration; the prompts and the reward function of the first iteration
        of this launch that generates (found at launch, not after iteration 0 trained)."""
        if not self.generates(iteration):
            super().preflight(iteration)
        later = [k for k in range(iteration, self.ctx.cfg.loop.num_iterations) if self.generates(k)]
        if later:
            rows = self.prompt_rows(later[0])
            chat.check_rows(rows, self.ctx.tokenizer, self.ctx.cfg.generation.prompts_file or "the prompts")
            check_reward(self.scorer(), rows, self.ctx.tokenizer, self.ctx.cfg.generation.samples_per_prompt)

    def rows_source(self, iteration: int) -> str:
        return super().rows_source(iteration) if iteration == 0 else str(self.data_dir(iteration) / ACCEPTED)

    def data_dir(self, iteration: int) -> Path:
        return self.ctx.root / data_name(iteration)

    def prompt_rows(self, iteration: int) -> list[dict[str, Any]]:
        gen = self.ctx.cfg.generation
        if gen.prompts_file:
            path = resolve_path(gen.prompts_file, iteration)
            rows = read_jsonl(path)
        else:
            path, rows = f"task {self.ctx.cfg.loop.task}", self.task().prompts(iteration)
        if not rows:
            raise UsageError(f"{path}: no prompt rows for iteration {iteration}")
        for n, row in enumerate(rows):
            if "prompt" not in row:
                raise UsageError(f"{path}: prompt row {n} has no 'prompt' field")
        return rows

    def settings(self, iteration: int) -> dict[str, Any]:
        """What the generated data depends on besides the weights: a change means regenerating."""
        gen = self.ctx.cfg.generation
        return {"seed": self.ctx.cfg.training.seed, "samples_per_prompt": gen.samples_per_prompt,
                "temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                **({"top_k": gen.top_k} if gen.top_k else {}),
                "reward_fn": gen.reward_fn or "exact_match", "reward_threshold": gen.reward_threshold,
                "prompts": resolve_path(gen.prompts_file, iteration) if gen.prompts_file else self.ctx.cfg.loop.task,
                **({"reward_model": os.path.abspath(gen.reward_model),
                    "reward_model_id": fingerprint(Path(gen.reward_model))} if gen.reward_model else {})}

    def committed_stats(self, iteration: int, source_id: str | None) -> dict[str, Any] | None:
        """Stats of committed data for this iteration made by these weights and settings; None if it
        must be (re)made. Data made by other weights or settings is moved to superseded/, not deleted."""
        directory = self.data_dir(iteration)
        try:
            manifest = read_manifest(directory)
        except ManifestError:
            manifest = None
        if (manifest is not None and manifest.extra.get("weights_id") == source_id
                and manifest.extra.get("settings") == self.settings(iteration)):
            return dict(manifest.extra.get("stats", {}))
        if directory.exists() or directory.is_symlink():
            dest = self.ctx.move_aside([data_name(iteration)])
            why = "came from other weights or settings" if manifest is not None else "was never committed"
            print(f"   📦 {data_name(iteration)} {why}: moved to {dest}", flush=True)
        return None

    def sample(self, iteration: int, source: ModelSource, rows: list[dict[str, Any]],
               purpose: tuple[str, ...] = ()) -> list[list[str]]:
        """`completions[i][s]`, on every rank (sharded across ranks, gathered), from the model the plan names:
        loaded for HF generate(), or its committed directory in a vLLM engine (--generation_backend).
        `purpose` joins the sampling seeds, so that (say) a probe never reuses the iteration's own seeds."""
        cfg, gen = self.ctx.cfg, self.ctx.cfg.generation
        sampling = Sampling(samples_per_prompt=gen.samples_per_prompt, temperature=gen.temperature, top_p=gen.top_p,
                            top_k=gen.top_k, max_new_tokens=gen.max_new_tokens, batch_size=gen.generation_batch_size,
                            seed_parts=(cfg.training.seed, iteration, *purpose), desc=f"generate iter_{iteration}",
                            progress=not cfg.training.disable_tqdm)
        model_dir = Path(cfg.model.model_name) if source.path == BASE else self.ctx.root / source.path
        prompts = [chat.render_prompt(r["prompt"], self.ctx.tokenizer) for r in rows]  # messages: as TRL renders them
        return generate(cfg, self.ctx.tokenizer, prompts, sampling, hf_model=source.load,
                        engine_model=lambda: engine_model_for(model_dir, cfg))

    def generate(self, iteration: int, source: ModelSource) -> dict[str, Any] | None:
        if not self.generates(iteration):
            return None
        stats = distributed.run_on_main(self.committed_stats, iteration, source.fingerprint)
        if stats is not None:
            if distributed.is_main():
                print(f"   ♻️  reusing committed {data_name(iteration)} (made by {source.path})", flush=True)
            return stats
        rows, decided = self.iteration_prompts(iteration, source)
        completions = self.sample(iteration, source, rows)
        rewards = self.score(rows, completions)
        return distributed.run_on_main(self.select_and_commit, iteration, rows, completions, rewards, source, decided)

    def iteration_prompts(self, iteration: int, source: ModelSource) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """This iteration's prompts and what decided them (recorded with the data). A built-in task with a
        curriculum picks them from the sampling model's pass rates on a probe; otherwise `prompt_rows`."""
        task = self.task() if self.ctx.cfg.loop.task and not self.ctx.cfg.generation.prompts_file else None
        if task is None or not hasattr(task, "curriculum"):
            return self.prompt_rows(iteration), {}
        from itertrain.tasks.curriculum import describe

        probe = task.probe_rows(iteration)
        rewards = self.probe_score(probe, self.sample(iteration, source, probe, ("probe",)))
        threshold = self.probe_threshold()
        passed = [sum(r is not None and r >= threshold for r in rs) / max(len(rs), 1) for rs in rewards]
        rows, decided = task.curriculum(iteration, passed)
        if distributed.is_main():
            print(f"   🎯 {data_name(iteration)} curriculum: prompts per digits {describe(decided['curriculum'])}",
                  flush=True)
        return rows, decided

    def training_arguments(self, iteration: int, args: Any) -> Any:
        """Iteration 0 (SFT on labeled rows) takes --sft_learning_rate / --sft_max_steps where given."""
        zero = self.ctx.cfg.strategy_args
        if iteration == 0 and isinstance(zero, IterationZeroArguments):
            if zero.sft_learning_rate is not None:
                args.learning_rate = zero.sft_learning_rate
            if zero.sft_max_steps is not None:
                args.max_steps = zero.sft_max_steps
        return args

    def scorer(self) -> RewardFunction | RewardModel:
        return reward_scorer(self.ctx.cfg.generation, self.ctx.cfg.model)

    def probe_score(self, rows: list[dict[str, Any]], completions: list[list[str]]) -> Rewards:
        """The rewards that decide the curriculum's pass rates (default: the iteration's own scorer)."""
        return self.score(rows, completions)

    def probe_threshold(self) -> float:
        """The reward at which a probe sample counts as solved (default: --reward_threshold, as for the data)."""
        return self.ctx.cfg.generation.reward_threshold

    def score(self, rows: list[dict[str, Any]], completions: list[list[str]]) -> Rewards:
        """`rewards[i][s]` on every rank: a reward model scores sharded over the ranks, a reward function
        runs on rank 0 (user code, called once)."""
        scorer = self.scorer()
        if isinstance(scorer, RewardModel):
            return scorer.score(rows, completions)
        return distributed.run_on_main(scorer.score, rows, completions, self.ctx.tokenizer)

    def commit(self, iteration: int, files: dict[str, list[dict[str, Any]]], stats: dict[str, Any],
               source: ModelSource) -> None:
        """Write the data files and commit data/iter_K with the lineage of the model that made them (rank 0)."""
        import json

        directory = self.data_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            write_jsonl(directory / name, rows)
        (directory / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        self.ctx.commit_data(directory, iteration, {"weights_from": source.path, "weights_id": source.fingerprint},
                             {"weights_id": source.fingerprint, "stats": stats, "settings": self.settings(iteration),
                              "generation": backend_record(self.ctx.cfg)})

    def select_and_commit(self, iteration: int, rows: list[dict[str, Any]], completions: list[list[str]],
                          rewards: Rewards, source: ModelSource, decided: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: turn the scored samples into training data, commit data/iter_K, return its stats (with
        `decided`, what chose the prompts)."""
        raise NotImplementedError

    @staticmethod
    def sample_rows(rows: list[dict[str, Any]], completions: list[list[str]], rewards: Rewards) -> list[dict[str, Any]]:
        """Every sample with its reward, as samples.jsonl holds them."""
        return [{"example": i, "sample": s, "prompt": row["prompt"], "completion": c, "reward": r}
                for i, (row, outs, rs) in enumerate(zip(rows, completions, rewards))
                for s, (c, r) in enumerate(zip(outs, rs))]

    def labeled_rows(self) -> list[dict[str, Any]]:
        """The labeled rows of iteration 0 (--train_file, --dataset_name or the task's)."""
        return SFTStrategy.train_rows(self, 0)

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        loop = self.ctx.cfg.loop
        if loop.eval_file:
            return read_jsonl(resolve_path(loop.eval_file, iteration))
        return self.task().eval_rows() if loop.task else None


class ExpertIterationStrategy(SampledDataStrategy):
    name = "expert_iteration"
    arguments_class = IterationZeroArguments
    defining_fields = ("prompts_file", "reward_fn", "reward_model", "data_policy")

    def select_and_commit(self, iteration: int, rows, completions, rewards: Rewards, source: ModelSource,
                          decided: dict[str, Any]) -> dict[str, Any]:
        threshold = self.ctx.cfg.generation.reward_threshold
        samples = self.sample_rows(rows, completions, rewards)
        accepted, seen, solved = [], set(), set()
        for s in samples:
            if s["reward"] is not None and s["reward"] >= threshold:  # None: not scored, never kept
                solved.add(s["example"])
                key = json.dumps([s["prompt"], s["completion"]], sort_keys=True)  # a prompt may be a message list
                if key not in seen:
                    seen.add(key)
                    accepted.append({"prompt": s["prompt"], "completion": chat.as_completion(s["prompt"], s["completion"])})
        n, solved = len(samples), len(solved)
        passed = sum(s["reward"] is not None and s["reward"] >= threshold for s in samples)
        # acceptance_rate counts every passing sample; `accepted` is what is kept after deduplication.
        stats = {"samples": n, "accepted": len(accepted), "acceptance_rate": passed / max(n, 1),
                 "prompts_solved": solved, "prompts": len(rows), **decided}
        self.commit(iteration, {SAMPLES: samples, ACCEPTED: accepted}, stats, source)
        print(f"   📦 {data_name(iteration)}: {passed} of {n} samples passed the verifier "
              f"({stats['acceptance_rate']:.1%}), {len(accepted)} distinct kept, {solved}/{len(rows)} prompts "
              "solved", flush=True)
        if 0 < stats["acceptance_rate"] < LOW_ACCEPTANCE and not self.ctx.cfg.generation.min_accepted:
            print(f"   ⚠️  only {stats['acceptance_rate']:.2%} of the samples passed: iteration {iteration} trains on "
                  f"{len(accepted)} distinct samples. Pass --min_accepted N to stop instead when fewer are kept",
                  flush=True)
        return stats

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        if iteration == 0:
            return self.labeled_rows()
        cumulative = self.ctx.cfg.generation.data_policy == "cumulative"
        rows = self.labeled_rows() if cumulative else []
        accepted = 0
        for k in range(1, iteration + 1) if cumulative else [iteration]:
            part = read_jsonl(self.data_dir(k) / ACCEPTED)
            accepted += len(part) if k == iteration else 0
            rows += part
        if accepted == 0:
            raise TrainingFailed(
                f"iteration {iteration}: the verifier accepted none of the sampled completions, so there is "
                "nothing to train on. Raise --num_generations or --temperature, or lower --reward_threshold; "
                f"the samples are in {self.data_dir(iteration) / SAMPLES}"
            )
        least = self.ctx.cfg.generation.min_accepted
        if accepted < least:
            raise TrainingFailed(
                f"iteration {iteration}: the verifier kept {accepted} distinct samples, fewer than --min_accepted "
                f"{least}, so the run stops before training on them. {data_name(iteration)} stays committed: relaunch "
                f"with --min_accepted {accepted} (or lower) and --resume_from auto --resume_from_iteration auto to "
                "train on it, or raise --num_generations or --temperature, or lower --reward_threshold, to sample "
                f"again; the samples are in {self.data_dir(iteration) / SAMPLES}")
        return rows
