"""Adaptive curriculum: which difficulties an iteration samples, decided from the sampling model's pass rates.

Expert iteration learns only from problems the current model sometimes solves: a problem it never
solves gives no answer to keep, one it always solves teaches little. A fixed schedule ("iteration K
samples K-step-harder problems") bets that the model has mastered the previous level by then, which
holds on one machine's rounding and fails on another's. Here each iteration first probes the model
that will sample (a few problems of every level, sampled as the iteration samples), then splits its
prompts: most go to the *frontier* (the easiest level whose pass rate is still below `advance_at`),
some to the level above it if the model solves any of it, and a small share to the levels already
passed, so that they are not forgotten. The decision is a pure function of the probe's outcome,
which depends only on the sampling model and the seed: a relaunch after a kill decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CurriculumRule:
    advance_at: float = 0.5  # a level whose sampled pass rate reaches this is passed; the frontier moves on
    frontier_share: float = 0.7
    stretch_share: float = 0.2  # the level above the frontier, when the probe saw it solved at least once
    review_share: float = 0.1  # the levels already passed, together


def frontier(pass_rates: dict, rule: CurriculumRule):
    """The easiest level not yet passed (the hardest level once all are). Levels are in the order of
    `pass_rates`, easiest first."""
    levels = list(pass_rates)
    return next((d for d in levels if pass_rates[d] < rule.advance_at), levels[-1])


def prompt_mix(pass_rates: dict, total: int, rule: CurriculumRule) -> dict:
    """How many of `total` prompts each level gets, from the pass rates per level (share of sampled
    answers the verifier accepted; levels in order, easiest first). Levels the model never solves above
    the frontier get none."""
    levels = list(pass_rates)
    top = frontier(pass_rates, rule)
    i = levels.index(top)
    below = levels[:i]
    shares = {d: rule.review_share / len(below) for d in below}
    shares[top] = rule.frontier_share
    if i + 1 < len(levels) and pass_rates[levels[i + 1]] > 0.0:
        shares[levels[i + 1]] = rule.stretch_share
    norm = sum(shares.values())
    exact = {d: total * s / norm for d, s in shares.items()}
    counts = {d: int(x) for d, x in exact.items()}
    # largest remainder, ties to the easier level: the counts add up to `total`, the same on every machine
    for d in sorted(exact, key=lambda d: (counts[d] - exact[d], levels.index(d)))[: total - sum(counts.values())]:
        counts[d] += 1
    return {d: counts[d] for d in levels if counts.get(d, 0) > 0}


def decision(pass_rates: dict[int, float], mix: dict[int, int], rule: CurriculumRule) -> dict:
    """What the data records (JSON: level keys as strings): the probe's pass rates, the frontier, the mix."""
    return {"curriculum": {"pass_rates": {str(d): round(r, 4) for d, r in pass_rates.items()},
                           "frontier": frontier(pass_rates, rule),
                           "prompt_mix": {str(d): n for d, n in mix.items()}}}


def ladder_order(level: str | int) -> tuple[int, bool]:
    """The arithmetic task's rungs in order, `ds` (a d-digit number and a shorter one) before `d` (two
    d-digit numbers): for a decision read back from JSON, whose keys come back sorted as text."""
    name = str(level)
    return int(name.rstrip("s")), not name.endswith("s")


def describe(curriculum: dict, rates: bool = True) -> str:
    """`4s:400 4:2800 5s:800` (prompts per rung), with `rates`: `... (pass 4s:90% 4:31% 5s:2% ...)`."""
    def ordered(d: dict) -> list:
        return sorted(d.items(), key=lambda kv: ladder_order(kv[0]))

    mix = " ".join(f"{d}:{n}" for d, n in ordered(curriculum["prompt_mix"]))
    if not rates:
        return mix
    return mix + " (pass " + " ".join(f"{d}:{r:.0%}" for d, r in ordered(curriculum["pass_rates"])) + ")"
