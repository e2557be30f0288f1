"""Held-out evaluation of what the method optimises: `--eval_prompts_file` (mean reward and pass@k).

In each iteration's evaluate stage, the model the iteration trained samples `--num_generations_eval`
completions per held-out prompt through the generation backend the strategies use (HF `generate()` or
vLLM; batches formed globally and dealt to ranks, gathered on every rank), with the strategies' sampling
flags (--temperature, --top_p, --top_k, --max_completion_length), and the reward scores them (--reward_funcs,
--reward_model, or exact match with the row's `answer`). The figures are committed with the iteration's
model (its manifest, runs/metrics.jsonl, the trackers):

- `heldout_mean_reward`: the mean reward of the scored samples;
- `heldout_pass_at_K` for K = 1, 2, 4, ... up to n: the unbiased pass@k estimator of Chen et al. (2021),
  1 - C(n-c, k) / C(n, k) for a prompt with c passing samples of n, averaged over the prompts; a sample
  passes when its reward is at least --reward_threshold (None, "not scored", never passes);
- `heldout_scored`: the share of samples the reward scored;
- `heldout_prompts`: the fingerprint of the held-out rows the figures are of (xxh3-128 of the rows, as the
  training data's). A relaunch whose --eval_prompts_file rows differ from those of the committed iterations
  it keeps is refused (exit 2, unless --allow_config_change): their figures would not be comparable.

Every sample draws its randomness from (seed, "heldout", example, sample): the same numbers in every
iteration (iterations differ by their model only) and in every launch. A launch stopped during the
evaluation has not committed the iteration; the relaunch rebuilds the same weights from the iteration's
final checkpoint and evaluates again with the same seeds, so it records the same figures. The starting
model is not evaluated (iteration 0 is the first row).
"""

from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Any

from itertrain import chat, distributed, faults
from itertrain.data import read_jsonl
from itertrain.data_lineage import rows_fingerprint
from itertrain.errors import RecoveryRefused, UsageError
from itertrain.metrics import committed_metrics
from itertrain.generation import Sampling, sample_trained
from itertrain.rewards import RewardModel, check_reward, reward_scorer

PREFIX = "heldout_"
FINGERPRINT = PREFIX + "prompts"  # the metrics key: which held-out rows the figures are of


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c pass (Chen et al. 2021): the chance that k
    samples drawn without replacement from the n include a passing one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, 2, 4, ... and n."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def summarize(rewards: list[list[float | None]], threshold: float) -> dict[str, float]:
    """The held-out figures from rewards[i][s] (n samples for each prompt i)."""
    n = len(rewards[0]) if rewards else 0
    scored = [r for rs in rewards for r in rs if r is not None]
    out = {f"{PREFIX}scored": len(scored) / max(sum(map(len, rewards)), 1)}
    if scored:  # no mean of nothing (NaN is not JSON)
        out[f"{PREFIX}mean_reward"] = sum(scored) / len(scored)
    passed = [sum(r is not None and r >= threshold for r in rs) for rs in rewards]
    for k in ks(n) if n else []:
        out[f"{PREFIX}pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in passed) / len(passed)
    return out


def prompt_rows(cfg) -> list[dict[str, Any]]:
    """The held-out prompt rows of --eval_prompts_file; UsageError when there are none or one has no prompt."""
    path = cfg.generation.eval_prompts_file
    rows = read_jsonl(path)
    if not rows:
        raise UsageError(f"--eval_prompts_file {path}: no prompt rows")
    for n, row in enumerate(rows):
        if not isinstance(row.get("prompt"), (str, list)):  # text, or messages (rendered with the chat template)
            raise UsageError(f"--eval_prompts_file {path}: row {n} has no 'prompt' (text or messages), got keys "
                             f"{sorted(row)}")
    return rows


def preflight(cfg, tokenizer: Any) -> None:
    """Before anything is written (rank 0): the held-out prompts are readable and the reward scores them."""
    gen = cfg.generation
    if not gen.eval_prompts_file:
        return
    if gen.num_generations_eval < 1:
        raise UsageError(f"--num_generations_eval {gen.num_generations_eval}: must be at least 1")
    rows = prompt_rows(cfg)
    chat.check_rows(rows, tokenizer, f"--eval_prompts_file {gen.eval_prompts_file}")
    check_reward(reward_scorer(gen, cfg.model), rows, tokenizer, gen.num_generations_eval)


def check_unchanged(cfg, root: Any, before: int) -> list[str]:
    """Before anything is written (rank 0), for a launch that keeps the committed iterations before `before`:
    refuse (RecoveryRefused, exit 2) when their held-out figures are of other rows than --eval_prompts_file
    holds now, or with --allow_config_change return the warning that says the figures will mix."""
    path = cfg.generation.eval_prompts_file
    if not path:
        return []
    kept = [r for r in committed_metrics(root) if r.get("iteration", 0) < before and r.get(FINGERPRINT)]
    now = rows_fingerprint(prompt_rows(cfg))
    if not kept or kept[-1][FINGERPRINT] == now:
        return []
    was, k = kept[-1][FINGERPRINT], kept[-1]["iteration"]
    what = (f"--eval_prompts_file {path} changed: its rows now have fingerprint {now}, the held-out figures of "
            f"iter_{k} are of rows with fingerprint {was}")
    if cfg.recovery.allow_config_change:
        return [f"{what} (the new iterations' held-out figures are of other prompts, allowed by "
                "--allow_config_change; runs/metrics.jsonl's heldout_prompts tells them apart)"]
    raise RecoveryRefused(
        f"{what}; the figures of the iterations this launch adds would not be comparable. Restore the file, "
        f"or start a new experiment on them: a new --output_dir (with --model_name_or_path {Path(root) / f'iter_{k}'}"
        " to continue from that iteration's model), or pass --allow_config_change to mix them.")


def evaluate(ctx: Any, iteration: int, model: Any) -> dict[str, float]:
    """The held-out figures of the model `iteration` trained (every rank calls it and gets them); {} without
    --eval_prompts_file."""
    cfg = ctx.cfg
    gen = cfg.generation
    if not gen.eval_prompts_file:
        return {}
    rows = prompt_rows(cfg)
    faults.point("heldout.sample")
    sampling = Sampling(samples_per_prompt=gen.num_generations_eval, temperature=gen.temperature, top_p=gen.top_p,
                        top_k=gen.top_k, max_new_tokens=gen.max_new_tokens, batch_size=gen.generation_batch_size,
                        seed_parts=(cfg.training.seed, "heldout"), desc=f"heldout iter_{iteration}",
                        progress=not cfg.training.disable_tqdm)
    prompts = [chat.render_prompt(r["prompt"], ctx.tokenizer) for r in rows]  # messages: as TRL renders them
    completions = sample_trained(model, ctx, prompts, sampling)
    scorer = reward_scorer(gen, cfg.model)
    if isinstance(scorer, RewardModel):
        rewards = scorer.score(rows, completions)
    else:  # user code, called once (rank 0), as the strategies score their samples
        rewards = distributed.run_on_main(scorer.score, rows, completions, ctx.tokenizer)
    return {**summarize(rewards, gen.reward_threshold), FINGERPRINT: rows_fingerprint(rows)}
