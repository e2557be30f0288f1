"""Rewards for the strategies that score their samples: `--reward_funcs module:function` or `--reward_model DIR`.

A reward function takes one of two forms, told apart by `fn.batched = True|False` when set, else by
the signature (a parameter named `prompts` or `completions` means batched):
- per sample: `fn(prompt, completion, answer) -> float` (called with keywords);
- batched, TRL's form (as GRPOTrainer calls it, all by keyword, so it must accept `**kwargs`):
  `fn(prompts=[...], completions=[...], completion_ids=[...], **columns, trainer_state=None,
  log_extra=..., log_metric=...) -> list[float | None]`, one entry per completion, where `prompts` repeats
  each prompt once per completion, `completion_ids` is each completion tokenized by the policy's
  tokenizer (no special tokens), `columns` are the prompt rows' other fields as lists (e.g. `answer=[...]`),
  `trainer_state` is None (sampling happens outside a Trainer) and `log_extra` / `log_metric` are no-ops.
A reward of None means "not scored" (TRL's convention): the sample is never kept or paired.
The function is imported with the current directory on the import path and tried at launch, before
anything is written, on a small batch in the call shape sampling uses: several prompt rows x several
made-up samples (`check_reward`, `check_reward_function`).

`--reward_model DIR` scores `prompt + completion` with a local AutoModelForSequenceClassification with
one label (its logit is the reward), tokenized by DIR's tokenizer, in batches formed globally and dealt
to ranks like generation's, gathered on every rank.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from itertrain import chat, distributed
from itertrain.errors import RewardFunctionError, UsageError

Rewards = list[list[float | None]]  # rewards[i][s]: completion s of prompt row i


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """The built-in reward: 1.0 when the completion is the reference answer (whitespace-trimmed)."""
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def _is_batched(fn: Callable[..., Any]) -> bool:
    marker = getattr(fn, "batched", None)
    if marker is not None:
        return bool(marker)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "prompts" in params or "completions" in params


def _ignore(*args: Any, **kwargs: Any) -> None:
    """TRL's log_extra / log_metric: accepted and ignored (there is no Trainer log while sampling)."""


def _flatten(rows: list[dict[str, Any]], completions: list[list[str]]) -> list[tuple[int, dict[str, Any], str]]:
    return [(i, row, c) for i, (row, outs) in enumerate(zip(rows, completions)) for c in outs]


def _unflatten(values: list[Any], completions: list[list[str]]) -> Rewards:
    out, k = [], 0
    for outs in completions:
        out.append(values[k:k + len(outs)])
        k += len(outs)
    return out


def plain(value: Any) -> Any:
    """A reward as a Python number, as TRL takes it: a numpy scalar or 0-d tensor or array by `.item()`, any
    other real number (Fraction, ...) by float(); anything else as it is (for the checks to name)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # np.float32, np.bool_, torch.tensor(1.)
        return value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _why_not(value: Any) -> str:
    """Why `value` is not a reward: the words of the refusal."""
    return f"{type(value).__name__}, " + ("not finite" if isinstance(value, (int, float)) else "not a number")


@dataclass
class RewardFunction:
    """A reward function of either form, called on batches: `score(rows, completions) -> rewards`."""

    fn: Callable[..., Any]
    spec: str
    batched: bool

    def score(self, rows: list[dict[str, Any]], completions: list[list[str]], tokenizer: Any = None) -> Rewards:
        """rewards[i][s] for completion s of prompt row i (`tokenizer`: for TRL's `completion_ids`)."""
        flat = _flatten(rows, completions)
        values = self.values(rows, completions, tokenizer)
        return _unflatten([self._number(v, i, row, c) for v, (i, row, c) in zip(values, flat)], completions)

    def values(self, rows: list[dict[str, Any]], completions: list[list[str]], tokenizer: Any = None) -> list[Any]:
        """What the function returned, one value per completion in row order, numbers made plain (`plain`)
        but otherwise unchecked (RewardFunctionError when it raised, or when a batched call returned another
        number of values)."""
        flat = _flatten(rows, completions)
        if self.batched:
            return [plain(v) for v in self._batched(flat, tokenizer)]
        return [plain(self._one(i, row, c)) for i, row, c in flat]

    def _batched(self, flat: list[tuple[int, dict[str, Any], str]], tokenizer: Any) -> list[Any]:
        texts = [c for _, _, c in flat]
        columns = {k: [row.get(k) for _, row, _ in flat] for k in sorted({k for _, r, _ in flat for k in r} - {"prompt"})}
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in texts] if tokenizer is not None else None
        # TRL's form: a conversational prompt's completions are assistant message lists
        shaped = [chat.as_completion(row["prompt"], c) for _, row, c in flat]
        try:
            values = list(self.fn(prompts=[row["prompt"] for _, row, _ in flat], completions=shaped, completion_ids=ids,
                                  **columns, trainer_state=None, log_extra=_ignore, log_metric=_ignore))
        except Exception as e:  # noqa: BLE001 - user code: report it readably, whatever it raised
            raise RewardFunctionError(f"reward function {self.spec} raised {type(e).__name__}: {e}") from e
        if len(values) != len(flat):
            raise RewardFunctionError(f"reward function {self.spec} returned {len(values)} rewards for "
                                      f"{len(flat)} completions")
        return values

    def _one(self, index: int, row: dict[str, Any], completion: str) -> Any:
        try:
            return self.fn(prompt=row["prompt"], completion=completion, answer=row.get("answer"))
        except Exception as e:  # noqa: BLE001 - user code: report it readably, whatever it raised
            raise RewardFunctionError(
                f"reward function {self.spec} raised {type(e).__name__}: {e} on example {index} "
                f"(prompt {row['prompt']!r}, completion {completion!r})"
            ) from e

    def _number(self, value: Any, index: int, row: dict[str, Any], completion: str) -> float | None:
        if value is None:
            return None
        # inf too: the samples' JSON would hold a non-standard `Infinity`, and a margin of inf - inf is NaN
        if not _valid(value):
            raise RewardFunctionError(
                f"reward function {self.spec} returned {value!r} ({_why_not(value)}) on example {index} "
                f"(prompt {row['prompt']!r}, completion {completion!r}); it must return a finite number or None"
            )
        return float(value)


def load_reward_fn(spec: str | None) -> RewardFunction:
    """The reward function `module:function` names (exact match when None); UsageError when it cannot
    be imported."""
    if not spec:
        return RewardFunction(exact_match, "exact_match", batched=False)
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UsageError(f"--reward_funcs {spec!r}: expected module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    try:
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported in one line
        raise UsageError(f"--reward_funcs {spec}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise UsageError(f"--reward_funcs {spec} is not callable")
    return RewardFunction(fn, spec, _is_batched(fn))


@dataclass
class RewardModel:
    """`--reward_model DIR`, scored on every rank together (a collective call)."""

    path: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    batch_size: int = 64

    @property
    def spec(self) -> str:
        return f"reward model {self.path}"

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) from DIR; UsageError when it is not a one-label sequence classifier."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from itertrain.weights import dtype_of

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                      trust_remote_code=self.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=dtype_of(self.dtype), local_files_only=True, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UsageError(f"--reward_model {self.path} cannot be loaded as a sequence classifier with its "
                             f"tokenizer ({str(e).splitlines()[0]})") from e
        if model.config.num_labels != 1:
            raise UsageError(f"--reward_model {self.path} has {model.config.num_labels} labels; a reward model has "
                             "one (its logit is the reward)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # positions as in training; the score is read at the last real token
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.eval(), tokenizer

    def score(self, rows: list[dict[str, Any]], completions: list[list[str]], tokenizer: Any = None, *,
              sharded: bool = True) -> Rewards:
        """rewards[i][s]. `sharded`: a collective call (every rank calls it and gets every score). Batches
        are formed over all samples (sorted by length) and dealt round-robin, so a score does not depend
        on the number of ranks."""
        import torch

        from itertrain.generation import deal

        model, tok = self.load()
        texts = [_scored_text(row["prompt"], c, tok) for _, row, c in _flatten(rows, completions)]
        order = sorted(range(len(texts)), key=lambda n: (len(texts[n]), n))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        scores: dict[int, float] = {}
        with torch.no_grad():
            for batch in deal(batches) if sharded else batches:
                enc = tok([texts[n] for n in batch], return_tensors="pt", padding=True).to(model.device)
                scores.update(zip(batch, model(**enc).logits[:, 0].float().tolist()))
        del model
        if sharded:
            scores = distributed.merge_gathered(scores)
        bad = next((n for n in range(len(texts)) if not math.isfinite(scores[n])), None)
        if bad is not None:  # an overflow in the model's dtype: not a reward that JSON or a margin can hold
            raise RewardFunctionError(f"reward model {self.path} scored sample {bad} {scores[bad]!r}; rewards must "
                                      "be finite (try --dtype float32)")
        return _unflatten([scores[n] for n in range(len(texts))], completions)


def _scored_text(prompt: Any, completion: str, tokenizer: Any) -> str:
    """What a reward model reads: prompt + completion, a conversation rendered with the reward model's own
    chat template (as TRL does)."""
    if isinstance(prompt, str):
        return prompt + completion
    out = chat.render({"prompt": prompt, "completion": chat.as_completion(prompt, completion)}, tokenizer)
    return out["prompt"] + out["completion"]


def why_no_pairs(samples: list[dict[str, Any]], min_margin: float) -> tuple[str, str]:
    """(why no prompt gave a preference pair, what to change), from the samples with their rewards."""
    if all(r.get("reward") is None for r in samples):
        return (f"none of the {len(samples)} samples was scored: the reward function returned None for every one",
                "Make the reward function return a number for the completions it can judge")
    return (f"every prompt's scored samples were within --min_reward_margin {min_margin} of each other",
            "Raise --num_generations or --temperature, or lower --min_reward_margin")


def reward_scorer(gen: Any, model_args: Any) -> RewardFunction | RewardModel:
    """What scores samples under these flags (GenerationArguments, ModelArguments)."""
    if gen.reward_model:
        return RewardModel(gen.reward_model, model_args.model_dtype, model_args.trust_remote_code,
                           gen.generation_batch_size)
    if isinstance(gen.reward_fn, list):
        raise UsageError(f"--reward_funcs {' '.join(gen.reward_fn)}: several reward functions are combined by "
                         "--strategy grpo and rloo (with --reward_weights); sampling, its selection and the held-out "
                         "evaluation score with one: pass one module:function")
    return load_reward_fn(gen.reward_fn)


LAUNCH_ROWS, LAUNCH_SAMPLES = 4, 4  # the launch check's batch: this many prompt rows x up to this many samples


def _valid(value: Any) -> bool:
    """A reward the strategies can use: a finite number, a bool, or None (not scored)."""
    return value is None or isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_reward_function(fn: RewardFunction | Callable[..., Any], prompts: list[str], completions: list[list[str]],
                          *, tokenizer: Any = None, **columns: list[Any]) -> None:
    """Call a reward function once on a whole small batch, in the call shape sampling uses (`completions[i]`:
    the samples of `prompts[i]`; `columns`: the prompt rows' other fields, one value per prompt), and raise
    UsageError (exit 2), in one line naming the function, when it raises, returns another number of rewards,
    returns something that is not a finite number or None (saying what, for how many), or None for all."""
    if not isinstance(fn, RewardFunction):
        fn = RewardFunction(fn, getattr(fn, "__qualname__", repr(fn)), _is_batched(fn))
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
    n = sum(map(len, completions))
    shape = f"{_count(len(rows), 'prompt')} x {_count(max(map(len, completions), default=0), 'sample')}"
    try:
        values = fn.values(rows, completions, tokenizer)
    except RewardFunctionError as e:
        raise UsageError(f"--reward_funcs {fn.spec} failed the launch check ({shape}): {e}") from e
    bad = [v for v in values if not _valid(v)]
    if bad:
        raise UsageError(f"--reward_funcs {fn.spec} returned {bad[0]!r} ({_why_not(bad[0])}) for {len(bad)} of {n} "
                         f"completions at launch ({shape}); it must return a finite number (or None: not scored) "
                         "for each")
    if n and all(v is None for v in values):
        raise UsageError(f"--reward_funcs {fn.spec} returned None (not scored) for all {n} completions at launch "
                         f"({shape}, the reference answer among them); nothing could ever be kept or paired")


def launch_batch(rows: list[dict[str, Any]], samples_per_prompt: int) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """The launch check's batch: the first prompt rows, each with 2..4 made-up samples (its reference answer,
    an empty completion, the answer reversed, "0"), so that wrong counts and types show before training."""
    rows = rows[:LAUNCH_ROWS]
    samples = min(max(samples_per_prompt, 2), LAUNCH_SAMPLES)
    completions = []
    for row in rows:
        answer = str(row.get("answer", ""))
        completions.append([answer, "", answer[::-1] + " ", "0"][:samples])
    return rows, completions


def check_reward(scorer: RewardFunction | RewardModel, rows: list[dict[str, Any]], tokenizer: Any = None,
                 samples_per_prompt: int = LAUNCH_SAMPLES) -> None:
    """Score the launch batch of `rows` (`launch_batch`) before anything is written (one process): a reward
    function through `check_reward_function`, a reward model unsharded. UsageError naming it when it fails."""
    batch, completions = launch_batch(rows, samples_per_prompt)
    if isinstance(scorer, RewardFunction):
        columns = {k: [row.get(k) for row in batch] for k in sorted({k for r in batch for k in r} - {"prompt"})}
        check_reward_function(scorer, [row["prompt"] for row in batch], completions, tokenizer=tokenizer, **columns)
        return
    try:
        scorer.score(batch, completions, sharded=False)
    except (UsageError, RewardFunctionError) as e:
        raise UsageError(f"{scorer.spec} failed at launch: {e}") from e
    except Exception as e:  # noqa: BLE001 - a reward model that cannot score is a usage error found at launch
        raise UsageError(f"{scorer.spec} failed at launch ({type(e).__name__}: {e})") from e
