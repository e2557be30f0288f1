"""The arithmetic task's adaptive curriculum: which difficulties an iteration samples, from the sampling
model's pass rates (pure functions; the demo's tests run it end to end)."""

from __future__ import annotations

from itertrain.tasks.arithmetic import ArithmeticTask
from itertrain.tasks.curriculum import CurriculumRule, prompt_mix

RULE = CurriculumRule()


def test_a_model_that_solves_little_of_4_digits_keeps_sampling_4_digits_with_a_share_of_5():
    # the AVX2 run: a third of 4-digit problems solved, 5-digit barely; the fixed schedule moved on
    assert prompt_mix({4: 0.32, 5: 0.02, 6: 0.0}, 4000, RULE) == {4: 3111, 5: 889}


def test_levels_the_model_never_solves_above_the_frontier_get_no_prompts():
    assert prompt_mix({4: 0.03, 5: 0.0, 6: 0.0}, 4000, RULE) == {4: 4000}


def test_passing_a_level_moves_the_frontier_and_keeps_passed_levels_at_a_small_share():
    mix = prompt_mix({4: 0.7, 5: 0.3, 6: 0.01}, 4000, RULE)
    assert mix == {4: 400, 5: 2800, 6: 800}
    assert prompt_mix({4: 0.9, 5: 0.8, 6: 0.6}, 4000, RULE) == {4: 250, 5: 250, 6: 3500}


def test_prompt_counts_always_add_up_to_the_requested_total():
    for rates in ({4: 0.32, 5: 0.02, 6: 0.0}, {4: 0.6, 5: 0.1, 6: 0.0}, {4: 1.0, 5: 0.55, 6: 0.2}):
        for total in (1, 7, 999, 4000):
            assert sum(prompt_mix(rates, total, RULE).values()) == total


def test_the_decision_follows_the_probe_and_is_recorded_with_its_pass_rates():
    task = ArithmeticTask(seed=0)
    probe = task.probe_rows(2)
    n = task.probe_per_level
    assert len(probe) == 3 * n and set(probe[0]) == {"prompt", "answer"}  # scored like any prompt row
    # the probe's model solves 40% of the 4-digit samples, 5% of the 5-digit ones, no 6-digit one
    passed = [0.4] * n + [0.05] * n + [0.0] * n
    rows, decided = task.curriculum(2, passed)
    assert decided == {"curriculum": {"pass_rates": {"4": 0.4, "5": 0.05, "6": 0.0}, "frontier": 4,
                                      "prompt_mix": {"4": 3111, "5": 889}}}
    assert len(rows) == task.prompts_per_iteration == len({r["prompt"] for r in rows})
    # 889 problems whose longer operand has 5 digits (written reversed, zero-padded to 6)
    longest = [max(len(x.rstrip("0") or "0") for x in r["prompt"].rstrip("=").split("+")) for r in rows]
    assert longest.count(5) == 889 and longest.count(4) == 3111
    heldout = {r["prompt"] for rows_ in task.heldout_sets().values() for r in rows_}
    assert not heldout & {r["prompt"] for r in rows + probe}  # never samples (or probes) a held-out problem
    # a relaunch decides the same from the same outcome: same prompts, same order
    again, decided_again = ArithmeticTask(seed=0).curriculum(2, passed)
    assert again == rows and decided_again == decided
