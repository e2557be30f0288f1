"""`--strategy expert_iteration`: rejection-sampling fine-tuning (STaR / ReST-EM style).

Iteration 0 is supervised fine-tuning on labeled data. Every later iteration K:
generate (sample --samples_per_prompt completions per prompt from the current model) -> score
(exact match with the reference answer, or --reward_fn) -> filter (keep reward >= threshold,
dedupe) -> commit data/iter_K/ -> train on it (--data_policy fresh|cumulative).

The committed data records which model produced it (`weights_id`, a fingerprint of iter_{K-1}'s
manifest) and the sampling settings; a relaunch reuses it only when both match, so the data can
never silently come from the wrong model.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

from itertrain import distributed
from itertrain.data import read_jsonl, resolve_path, write_jsonl
from itertrain.errors import RewardFunctionError, TrainingFailed, UsageError
from itertrain.fsutil import safe_rmtree
from itertrain.generation import heldout_accuracy, sample_completions
from itertrain.recovery.manifest import ManifestError, read_manifest
from itertrain.recovery.restore import manifest_id
from itertrain.strategies.base import Strategy

ACCEPTED = "accepted.jsonl"
SAMPLES = "samples.jsonl"


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """The built-in reward: 1.0 when the completion is the reference answer (whitespace-trimmed)."""
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def load_reward_fn(spec: str | None) -> Callable[..., Any]:
    if not spec:
        return exact_match
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--reward_fn {spec}: cannot import it ({e})") from e
    if not callable(fn):
        raise UsageError(f"--reward_fn {spec} is not callable")
    return fn


def score(fn: Callable[..., Any], spec: str, index: int, row: dict[str, Any], completion: str) -> float:
    """Call the reward function for one sample; any failure names the function and the example."""
    try:
        value = fn(prompt=row["prompt"], completion=completion, answer=row.get("answer"))
    except Exception as e:  # noqa: BLE001 - user code: report it readably, whatever it raised
        raise RewardFunctionError(
            f"reward function {spec} raised {type(e).__name__}: {e} on example {index} "
            f"(prompt {row['prompt']!r}, completion {completion!r})"
        ) from e
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise RewardFunctionError(
            f"reward function {spec} returned {value!r} ({type(value).__name__}) on example {index} "
            f"(prompt {row['prompt']!r}, completion {completion!r}); it must return a number"
        )
    return float(value)


class ExpertIterationStrategy(Strategy):
    name = "expert_iteration"

    def _task(self):
        from itertrain.tasks import get_task

        loop = self.ctx.cfg.loop
        return get_task(loop.task, self.ctx.cfg.training.seed) if loop.task else None

    def _data_dir(self, iteration: int) -> Path:
        return self.ctx.root / "data" / f"iter_{iteration}"

    def prompt_rows(self, iteration: int) -> list[dict[str, Any]]:
        loop = self.ctx.cfg.loop
        if loop.prompts_file:
            rows = read_jsonl(resolve_path(loop.prompts_file, iteration))
        else:
            rows = self._task().prompts(iteration)
        for n, row in enumerate(rows):
            if "prompt" not in row:
                raise UsageError(f"prompt row {n} has no 'prompt' field")
        return rows

    def _settings(self, iteration: int) -> dict[str, Any]:
        """What the generated data depends on besides the weights: a change means regenerating."""
        loop = self.ctx.cfg.loop
        return {"seed": self.ctx.cfg.training.seed, "samples_per_prompt": loop.samples_per_prompt,
                "temperature": loop.temperature, "top_p": loop.top_p, "max_new_tokens": loop.max_new_tokens,
                "reward_fn": loop.reward_fn or "exact_match", "reward_threshold": loop.reward_threshold,
                "prompts": resolve_path(loop.prompts_file, iteration) if loop.prompts_file else loop.task}

    def _committed_stats(self, iteration: int, weights_id: str | None) -> dict[str, Any] | None:
        """Stats of committed data for this iteration made by these weights and settings; None if it
        must be (re)made. Data made by other weights or settings is moved to superseded/, not deleted."""
        directory = self._data_dir(iteration)
        try:
            manifest = read_manifest(directory)
        except ManifestError:
            manifest = None
        if (manifest is not None and manifest.extra.get("weights_id") == weights_id
                and manifest.extra.get("settings") == self._settings(iteration)):
            return dict(manifest.extra.get("stats", {}))
        if manifest is not None:
            dest = self.ctx.manager.move_aside([f"data/iter_{iteration}"])
            print(f"   📦 data/iter_{iteration} came from other weights or settings: moved to {dest}", flush=True)
        elif directory.exists():  # torn: never committed
            safe_rmtree(directory, self.ctx.root)
        return None

    def generates(self, iteration: int) -> bool:
        return iteration > 0  # iteration 0 learns from labeled data

    def generate(self, iteration: int, model, weights_from: str) -> dict[str, Any] | None:
        """Sample from iter_{K-1}, the newest model when iteration K starts, whatever this launch
        resumes from (a checkpoint mid-iteration must not change the iteration's data)."""
        if not self.generates(iteration):
            return None
        cfg, loop = self.ctx.cfg, self.ctx.cfg.loop
        source = f"iter_{iteration - 1}"
        weights_id = manifest_id(self.ctx.root / source)
        stats = distributed.run_on_main(self._committed_stats, iteration, weights_id)
        if stats is not None:
            if distributed.is_main():
                print(f"   ♻️  reusing committed data/iter_{iteration} ({stats.get('accepted')} accepted samples)")
            return stats
        sampler = model
        if weights_from != source:  # e.g. ReST-EM (--iteration_init base) trains from the base model
            from itertrain.recovery.restore import load_model

            sampler = load_model(self.ctx.root / source, cfg.model.model_dtype, cfg.model.trust_remote_code)
        rows = self.prompt_rows(iteration)
        completions = sample_completions(
            sampler, self.ctx.tokenizer, [r["prompt"] for r in rows],
            samples_per_prompt=loop.samples_per_prompt, temperature=loop.temperature, top_p=loop.top_p,
            max_new_tokens=loop.max_new_tokens, batch_size=loop.generation_batch_size,
            seed_parts=(cfg.training.seed, iteration), desc=f"generate iter_{iteration}",
            progress=not cfg.training.disable_tqdm,
        )
        return distributed.run_on_main(self._score_and_commit, iteration, rows, completions, weights_id)

    def _score_and_commit(self, iteration: int, rows, completions, weights_id) -> dict[str, Any]:
        loop = self.ctx.cfg.loop
        fn = load_reward_fn(loop.reward_fn)
        spec = loop.reward_fn or "exact_match"
        samples, accepted, seen, solved = [], [], set(), 0
        for i, (row, outs) in enumerate(zip(rows, completions)):
            ok_any = False
            for s, completion in enumerate(outs):
                reward = score(fn, spec, i, row, completion)
                samples.append({"example": i, "sample": s, "prompt": row["prompt"], "completion": completion,
                                "reward": reward})
                if reward >= loop.reward_threshold:
                    ok_any = True
                    if (row["prompt"], completion) not in seen:
                        seen.add((row["prompt"], completion))
                        accepted.append({"prompt": row["prompt"], "completion": completion})
            solved += ok_any
        n = len(samples)
        passed = sum(s["reward"] >= loop.reward_threshold for s in samples)
        # acceptance_rate counts every passing sample; `accepted` is what is kept after deduplication.
        stats = {"samples": n, "accepted": len(accepted), "acceptance_rate": passed / max(n, 1),
                 "prompts_solved": solved, "prompts": len(rows)}
        directory = self._data_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        write_jsonl(directory / SAMPLES, samples)
        write_jsonl(directory / ACCEPTED, accepted)
        (directory / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        self.ctx.manager.commit_data(directory, iteration, {"weights_id": weights_id, "stats": stats,
                                                           "settings": self._settings(iteration)})
        print(f"   📦 data/iter_{iteration}: {passed} of {n} samples passed the verifier "
              f"({stats['acceptance_rate']:.1%}), {len(accepted)} distinct kept, {solved}/{len(rows)} prompts "
              "solved", flush=True)
        return stats

    def _labeled_rows(self) -> list[dict[str, Any]]:
        loop = self.ctx.cfg.loop
        return read_jsonl(resolve_path(loop.train_file, 0)) if loop.train_file else self._task().labeled_rows()

    def train_rows(self, iteration: int) -> list[dict[str, Any]]:
        if iteration == 0:
            return self._labeled_rows()
        its = range(1, iteration + 1) if self.ctx.cfg.loop.data_policy == "cumulative" else [iteration]
        rows = self._labeled_rows() if self.ctx.cfg.loop.data_policy == "cumulative" else []
        accepted = 0
        for k in its:
            part = read_jsonl(self._data_dir(k) / ACCEPTED)
            accepted += len(part) if k == iteration else 0
            rows += part
        if accepted == 0:
            raise TrainingFailed(
                f"iteration {iteration}: the verifier accepted none of the sampled completions, so there is "
                "nothing to train on. Raise --samples_per_prompt or --temperature, or lower --reward_threshold; "
                f"the samples are in {self._data_dir(iteration) / SAMPLES}"
            )
        return rows

    def eval_rows(self, iteration: int) -> list[dict[str, Any]] | None:
        loop = self.ctx.cfg.loop
        if loop.eval_file:
            return read_jsonl(resolve_path(loop.eval_file, iteration))
        return self._task().eval_rows() if loop.task else None

    def task_metrics(self, iteration: int, model) -> dict[str, float]:
        if not self.ctx.cfg.loop.task:
            return {}
        return heldout_accuracy(self._task(), model, self.ctx)
