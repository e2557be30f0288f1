"""Built-in task `arithmetic`: addition, easy labeled problems first, harder unlabeled ones later.

Numbers are written least-significant digit first ("reversed") and zero-padded to a fixed width,
operands to `width` digits and the answer to `width + 1`: with width 6, 123 + 989 = 1112 reads
`321000+989000=2111000`. With that order, each answer digit depends on the digits just read plus a
carry, which a tiny model can learn; it is the usual setup of easy-to-hard self-improvement
studies. The fixed width puts answer digit i at the same distance from operand digits i in every
problem, so what the model learns on short numbers carries over to a few longer ones (without the
padding, a model trained on 1..3 digits solves no 4-digit problem at all, not even by sampling, and
expert iteration has nothing to start from). Iteration 0 trains on labeled problems of
1..`base_digits` digits; each expert iteration samples answers to unlabeled harder problems, keeps
the ones the exact-match verifier accepts, and trains on them. Which difficulties an iteration
samples is decided from the sampling model's pass rates (`curriculum`, see itertrain/tasks/curriculum.py);
`prompts(K)` is the fixed schedule (`base_digits + K` digits) that preflight checks read. Numbers
with more than `width` digits are padded to their own length (a layout the model has not seen).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from itertrain.tasks.curriculum import CurriculumRule, decision, prompt_mix


def rev(n: int, width: int = 0) -> str:
    """`n` least-significant digit first, zero-padded to `width` digits."""
    return str(n).zfill(width)[::-1]


def problem(a: int, b: int, width: int = 0) -> dict[str, str]:
    return {"prompt": f"{rev(a, width)}+{rev(b, width)}=", "answer": rev(a + b, width + 1)}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


@dataclass
class ArithmeticTask:
    seed: int = 0
    base_digits: int = 3  # labeled problems have 1..base_digits digits
    labeled_examples: int = 2000
    prompts_per_iteration: int = 4000
    heldout_per_level: int = 500  # one noisy iteration must not read as a fall (1 problem = 0.2%)
    heldout_levels: int = 4  # held-out sets for base_digits .. base_digits + heldout_levels - 1
    width: int = 6  # operands are written with this many digits, the answer with one more
    probe_per_level: int = 64  # problems per level the sampling model is probed on before each iteration
    rule: CurriculumRule = CurriculumRule()

    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("/".join(map(str, ("arithmetic", self.seed, *parts))))

    def _problems(self, rng: random.Random, n: int, digits: tuple[int, int], seen: set[str],
                  other: tuple[int, int] | None = None) -> list[dict[str, str]]:
        """n distinct problems whose operands have `digits` digits (a range); with `other`, one operand
        has `digits` and the other `other` digits, in random order."""
        out: list[dict[str, str]] = []
        while len(out) < n:
            a, b = _number(rng, rng.randint(*digits)), _number(rng, rng.randint(*(other or digits)))
            if other is not None and rng.random() < 0.5:
                a, b = b, a
            p = problem(a, b, self.width)
            if p["prompt"] not in seen:
                seen.add(p["prompt"])
                out.append(p)
        return out

    def _heldout_prompts(self) -> set[str]:
        return {r["prompt"] for rows in self.heldout_sets().values() for r in rows}

    def heldout_sets(self) -> dict[str, list[dict[str, str]]]:
        """Exact-match evaluation sets, one per number of digits (never trained on)."""
        sets = {}
        for d in range(self.base_digits, self.base_digits + self.heldout_levels):
            sets[f"{d}digit"] = self._problems(self._rng("heldout", d), self.heldout_per_level, (d, d), set())
        return sets

    def labeled_rows(self) -> list[dict[str, str]]:
        """Iteration 0's supervised data: prompt/completion with 1..base_digits digit operands."""
        seen = self._heldout_prompts()
        rows = self._problems(self._rng("labeled"), self.labeled_examples, (1, self.base_digits), seen)
        return [{"prompt": r["prompt"], "completion": r["answer"]} for r in rows]

    def prompts(self, iteration: int) -> list[dict[str, str]]:
        """Unlabeled problems for expert iteration `iteration` (the answer is for the verifier only): one
        operand has base_digits + iteration digits, the other 1..base_digits + iteration."""
        d = self.base_digits + iteration
        return self._problems(self._rng("prompts", iteration), self.prompts_per_iteration, (d, d),
                              self._heldout_prompts(), other=(1, d))

    def levels(self) -> list[str]:
        """The difficulties expert iteration may sample, easiest first: for each number of digits d past
        the labeled ones, `ds` (a d-digit number plus a shorter one) then `d` (two d-digit numbers, the
        held-out set's problems)."""
        return [f"{d}{s}" for d in range(self.base_digits + 1, self.base_digits + self.heldout_levels)
                for s in ("s", "")]

    def _level_problems(self, rng: random.Random, n: int, level: str, seen: set[str]) -> list[dict[str, str]]:
        d = int(level.rstrip("s"))
        if level.endswith("s"):  # a d-digit number and a shorter one: the step before d-digit pairs
            return self._problems(rng, n, (d, d), seen, other=(1, d - 1))
        return self._problems(rng, n, (d, d), seen)  # two d-digit numbers, as the held-out set of d digits

    def probe_rows(self, iteration: int) -> list[dict[str, str]]:
        """The problems that measure the sampling model's pass rate per level before iteration `iteration`:
        `probe_per_level` of each level in `levels()`, in that order."""
        seen = self._heldout_prompts()
        return [r for d in self.levels()
                for r in self._level_problems(self._rng("probe", iteration, d), self.probe_per_level, d, seen)]

    def curriculum(self, iteration: int, passed: list[float]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Iteration `iteration`'s prompts, from the probe's outcome (`passed[i]`: share of the samples of
        `probe_rows(iteration)[i]` the verifier accepted), and the decision to record with the data."""
        n = self.probe_per_level
        rates = {d: sum(passed[i * n:(i + 1) * n]) / n for i, d in enumerate(self.levels())}
        mix = prompt_mix(rates, self.prompts_per_iteration, self.rule)
        return self.mix_rows(iteration, mix), decision(rates, mix, self.rule)

    def mix_rows(self, iteration: int, mix: dict[str, int]) -> list[dict[str, str]]:
        """The prompts of iteration `iteration` for a mix of {rung: count} (what a recorded decision names), in
        the ladder's order whatever the mapping's (a decision read back from JSON has its keys sorted as text)."""
        seen = self._heldout_prompts()
        return [r for d in self.levels() if mix.get(d)
                for r in self._level_problems(self._rng("prompts", iteration, d), mix[d], d, seen)]

    def eval_rows(self) -> list[dict[str, str]]:
        """Labeled held-out rows for the eval loss (base difficulty)."""
        rows = self.heldout_sets()[f"{self.base_digits}digit"]
        return [{"prompt": r["prompt"], "completion": r["answer"]} for r in rows]

    @staticmethod
    def is_correct(completion: str, answer: str) -> bool:
        return completion.strip() == answer.strip()


def digit_credit(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """A shaped reward in TRL's batched form (`--reward_funcs itertrain.tasks.arithmetic:digit_credit`): the
    share of answer digits right in their place, less the length error relative to the answer. Unlike
    exact match it ranks the wrong answers of a model that gets none right, so that such a model's
    samples still form preference pairs."""
    out = []
    for completion, ans in zip(completions, answer):
        c, a = completion.strip(), str(ans).strip()
        out.append((sum(x == y for x, y in zip(c, a)) - abs(len(c) - len(a))) / max(len(a), 1))
    return out
