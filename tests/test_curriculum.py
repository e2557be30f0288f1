"""The arithmetic task's adaptive curriculum: which difficulties an iteration samples, from the sampling
model's pass rates (pure functions; the demo's tests run it end to end)."""

from __future__ import annotations

import json

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


def test_levels_in_the_given_order_easiest_first_whatever_their_names():
    # the arithmetic task's ladder: a d-digit number with a shorter one, then two d-digit numbers
    rates = {"4s": 0.9, "4": 0.3, "5s": 0.01, "5": 0.0, "6s": 0.0, "6": 0.0}
    assert prompt_mix(rates, 4000, RULE) == {"4s": 400, "4": 2800, "5s": 800}
    assert prompt_mix({**rates, "4": 0.6, "5s": 0.2, "5": 0.0}, 4000, RULE) == {"4s": 250, "4": 250, "5s": 3500}


def _digits(row: dict[str, str]) -> list[int]:
    """The operands' digit counts, longer first (numbers are written reversed and zero-padded)."""
    return sorted((len(x.rstrip("0") or "0") for x in row["prompt"].rstrip("=").split("+")), reverse=True)


def test_each_level_is_one_rung_and_a_level_of_d_digit_pairs_is_the_held_out_sets_kind_of_problem():
    task = ArithmeticTask(seed=0)
    assert task.levels() == ["4s", "4", "5s", "5", "6s", "6"]
    n = task.probe_per_level
    probe = task.probe_rows(1)
    assert all(_digits(r)[0] == 4 and _digits(r)[1] < 4 for r in probe[:n])  # 4s: a shorter partner
    assert all(_digits(r) == [4, 4] for r in probe[n:2 * n])  # 4: two 4-digit numbers ...
    assert all(_digits(r) == [4, 4] for r in task.heldout_sets()["4digit"])  # ... as the held-out 4-digit set
    assert all(_digits(r) == [6, 6] for r in probe[5 * n:])


def test_the_decision_follows_the_probe_and_is_recorded_with_its_pass_rates():
    task = ArithmeticTask(seed=0)
    probe = task.probe_rows(2)
    n = task.probe_per_level
    assert len(probe) == 6 * n and set(probe[0]) == {"prompt", "answer"}  # scored like any prompt row
    # the probe's model solves most 4-digit problems with a shorter partner, 40% of 4-digit pairs, 5% of the
    # 5-digit problems with a shorter partner, nothing harder
    passed = [0.9] * n + [0.4] * n + [0.05] * n + [0.0] * (3 * n)
    rows, decided = task.curriculum(2, passed)
    assert decided == {"curriculum": {"pass_rates": {"4s": 0.9, "4": 0.4, "5s": 0.05, "5": 0.0, "6s": 0.0, "6": 0.0},
                                      "frontier": "4", "prompt_mix": {"4s": 400, "4": 2800, "5s": 800}}}
    assert len(rows) == task.prompts_per_iteration == len({r["prompt"] for r in rows})
    shapes = [_digits(r) for r in rows]
    assert sum(d == [4, 4] for d in shapes) == 2800
    assert sum(d[0] == 4 and d[1] < 4 for d in shapes) == 400 and sum(d[0] == 5 and d[1] < 5 for d in shapes) == 800
    heldout = {r["prompt"] for rows_ in task.heldout_sets().values() for r in rows_}
    assert not heldout & {r["prompt"] for r in rows + probe}  # never samples (or probes) a held-out problem
    # a relaunch decides the same from the same outcome: same prompts, same order
    again, decided_again = ArithmeticTask(seed=0).curriculum(2, passed)
    assert again == rows and decided_again == decided


def test_a_decision_read_back_with_its_keys_sorted_as_text_names_the_same_prompts_in_the_same_order():
    task = ArithmeticTask(seed=0)
    n = task.probe_per_level
    rows, decided = task.curriculum(2, [0.9] * n + [0.4] * n + [0.05] * n + [0.0] * (3 * n))
    recorded = json.loads(json.dumps(decided, sort_keys=True))["curriculum"]["prompt_mix"]  # as metrics.jsonl has it
    assert list(recorded) == ["4", "4s", "5s"]
    assert task.mix_rows(2, recorded) == rows


def test_the_demo_benchmark_table_lists_each_decision_in_ladder_order_as_the_demo_prints_it():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_runs.py"
    spec = importlib.util.spec_from_file_location("demo_runs", path)
    demo_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_runs)
    row = json.loads(json.dumps({"curriculum": {"prompt_mix": {"4s": 400, "4": 2800, "5s": 800}}}, sort_keys=True))
    assert demo_runs.decisions([{"iteration": 0}, row]) == ["4s:400 4:2800 5s:800"]
