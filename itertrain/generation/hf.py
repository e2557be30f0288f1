"""The Hugging Face backend (`--generation_backend hf`): batched `generate()` with per-sample seeds,
sharded across ranks and gathered.

Determinism: every (example, sample) pair draws its randomness from its own generator seeded by
(seed, iteration, example index, sample index), applied with the Gumbel-max trick (an exact sample
from the temperature/top-p distribution, taken by a greedy `generate()`). So a sample does not
depend on what else is in its batch or which rank produced it, and a regenerated stage is
identical. Batches are formed globally and dealt to ranks round-robin.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from itertrain import distributed, faults
from itertrain.generation.common import Request, example_seed, global_batches


class GumbelSampler(LogitsProcessor):
    """Temperature, top-k and top-p, then per-row Gumbel noise: argmax of the result is a sample."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, top_k: int = 0):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_scores.softmax(dim=-1)
            remove = probs.cumsum(dim=-1) - probs > self.top_p  # keep the smallest set reaching top_p
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise.clamp_(1e-20, 1.0 - 1e-7)))
        return scores + gumbel.to(scores.device)


def _generate_batch(model, tokenizer, batch: list[Request], *, seed_parts: tuple, temperature: float,
                    top_p: float, top_k: int, max_new_tokens: int) -> list[str]:
    from itertrain.data import prompt_ids  # the prompt's ids as training sees them (StrategyContext.encode)

    enc = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, r.prompt) for r in batch]}, return_tensors="pt").to(model.device)
    kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens, "use_cache": True,
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        seeds = [example_seed(*seed_parts, r.example, r.sample) for r in batch]
        kwargs["logits_processor"] = LogitsProcessorList([GumbelSampler(seeds, temperature, top_p, top_k)])
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    samples_per_prompt: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed_parts: tuple = (0,),
    desc: str = "generate",
    progress: bool = True,
) -> list[list[str]]:
    """completions[i][s] for prompt i, sample s, on every rank. temperature 0 means greedy."""
    from tqdm.auto import tqdm

    batches = global_batches(prompts, samples_per_prompt, batch_size)
    requests = [r for b in batches for r in b]
    rank, world = distributed.rank(), distributed.world_size()
    was_training = model.training
    model.eval()
    results: dict[tuple[int, int], str] = {}
    bar = tqdm(total=len(requests), desc=desc, unit="sample", disable=rank != 0 or not progress,
               dynamic_ncols=True)
    for first in range(0, len(batches), world):
        # one round: every rank takes one batch; the bar (rank 0) counts the whole round
        round_ = batches[first:first + world]
        if rank >= len(round_):
            break
        batch = round_[rank]
        faults.point("generation.batch")
        texts = _generate_batch(model, tokenizer, batch, seed_parts=seed_parts, temperature=temperature,
                                top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
        for r, t in zip(batch, texts):
            results[(r.example, r.sample)] = t
        bar.update(sum(map(len, round_)))
    bar.close()
    if was_training:
        model.train()
    merged = distributed.merge_gathered(results)
    return [[merged[(i, s)] for s in range(samples_per_prompt)] for i in range(len(prompts))]
