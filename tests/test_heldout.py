"""Held-out evaluation per iteration (--eval_prompts_file): the pass@k estimator, the table and plot, real 2-rank
runs whose figures are committed per iteration and are the same after a SIGKILL during the evaluation and a
relaunch; and expert iteration's warning when very few samples pass."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import itertrain, torchrun

RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")


# ---- pure parts ---------------------------------------------------------------------------------------------
def test_pass_at_k_matches_hand_computed_values():
    from itertrain.heldout import pass_at_k

    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(4, 3, 2) == 1.0  # fewer failures than k: a passing sample is always drawn
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)  # k > n: not estimable from n samples


def test_summary_averages_pass_at_k_over_prompts_and_never_passes_an_unscored_sample():
    from itertrain.heldout import summarize

    got = summarize([[1.0, 0.0, None, 1.0], [0.0, 0.0, 0.0, 0.0]], threshold=1.0)
    assert got == pytest.approx({"heldout_pass_at_1": (0.5 + 0) / 2, "heldout_pass_at_2": (5 / 6 + 0) / 2,
                                 "heldout_pass_at_4": (1 + 0) / 2, "heldout_mean_reward": 2 / 7,
                                 "heldout_scored": 7 / 8})
    assert summarize([[None, None]], threshold=0.0) == {"heldout_scored": 0.0, "heldout_pass_at_1": 0.0,
                                                       "heldout_pass_at_2": 0.0}


def test_table_and_plot_show_the_heldout_figures_in_their_own_columns_and_panel(tmp_path):
    from itertrain.plot import metrics_table, panels, plot_metrics, plugin_keys

    rows = [{"iteration": k, "train_loss": 1.0, "heldout_mean_reward": 0.25 * k, "heldout_scored": 1.0,
             "heldout_pass_at_1": 0.1 * k, "heldout_pass_at_2": 0.15 * k, "heldout_pass_at_4": 0.2 * k,
             "wall_time_s": 3} for k in (0, 1)]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = metrics_table(tmp_path).splitlines()
    assert table[0] == "| iter | train loss | heldout reward | heldout pass@1 | heldout pass@4 | wall s |"
    assert table[3] == "| 1 | 1.000 | 0.250 | 10.0% | 20.0% | 3 |"
    assert panels(rows) == ["loss", "heldout"] and plugin_keys(rows) == []  # not also drawn as a plug-in's metric
    assert plot_metrics(tmp_path, tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


# ---- real runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory) -> Path:
    rng = random.Random(7)
    p = tmp_path_factory.mktemp("heldout") / "eval_prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                         for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(8))))
    return p


def heldout_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("heldout_") or k == "iteration"} for r in rows]


@pytest.mark.slow
def test_heldout_figures_per_iteration_are_identical_after_a_sigkill_during_evaluation_on_two_ranks(
        tmp_path, sft_args, eval_prompts):
    # A shaped reward (share of answer digits right) and threshold 0, so an untrained tiny model's figures
    # are not all zero; 8 prompts x 4 samples in batches of 8: two batches per rank per evaluation.
    flags = ("--eval_prompts_file", str(eval_prompts), "--num_generations_eval", "4", "--max_new_tokens", "4",
             "--generation_batch_size", "8", "--temperature", "1.0", "--reward_threshold", "0.5",
             "--reward_fn", "itertrain.tasks.arithmetic:digit_credit")
    ref = tmp_path / "ref"
    r = torchrun(*sft_args(ref, *flags))
    assert r.returncode == 0, r.output
    expected = heldout_rows(ref)
    assert [row["iteration"] for row in expected] == [0, 1]
    for row in expected:
        assert set(row) == {"iteration", "heldout_mean_reward", "heldout_scored", "heldout_pass_at_1",
                            "heldout_pass_at_2", "heldout_pass_at_4", "heldout_prompts"}
        assert row["heldout_pass_at_1"] <= row["heldout_pass_at_2"] <= row["heldout_pass_at_4"]
    assert "📈 iter_1: " in r.stdout and "heldout_pass_at_4=" in r.stdout

    out = tmp_path / "killed"
    # rank 0's third sampling batch: the first of iteration 1's evaluation (the job is SIGKILLed whole)
    r = torchrun(*sft_args(out, *flags), fault="generation.batch=kill#3@0")
    assert r.returncode != 0
    assert (out / "iter_0" / "itertrain.manifest.json").exists() and not (out / "iter_1").exists()
    r = torchrun(*sft_args(out, *flags), *RESUME)
    assert r.returncode == 0, r.output
    assert heldout_rows(out) == expected
    assert (out / "iter_1" / "model.safetensors").read_bytes() == (ref / "iter_1" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_eval_prompts_without_a_prompt_field_are_refused_before_anything_is_written(tmp_path, sft_args):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out, "--eval_prompts_file", str(bad)))
    assert r.returncode == 2, r.output
    assert f"--eval_prompts_file {bad}: row 0 has no 'prompt' (text or messages), got keys ['answer', 'question']" in r.stderr
    assert not out.exists()


def test_expert_iteration_warns_when_under_1_percent_of_samples_pass_unless_min_accepted_is_set(tmp_path, capsys):
    from types import SimpleNamespace

    from itertrain.strategies.expert_iteration import ExpertIterationStrategy

    def select(min_accepted: int) -> str:
        gen = SimpleNamespace(reward_threshold=1.0, min_accepted=min_accepted)
        strategy = ExpertIterationStrategy(SimpleNamespace(cfg=SimpleNamespace(generation=gen), root=tmp_path))
        strategy.commit = lambda *args: None  # the data files are not what this is about
        rows = [{"prompt": "1+1="}, {"prompt": "2+2="}]
        completions = [[str(s) for s in range(150)], [str(s) for s in range(150)]]
        rewards = [[1.0 if s == 2 else 0.0 for s in range(150)], [0.0] * 150]  # 1 of 300 passes
        stats = strategy.select_and_commit(1, rows, completions, rewards, None, {})
        assert stats["accepted"] == 1 and stats["acceptance_rate"] == 1 / 300
        return capsys.readouterr().out

    assert ("⚠️  only 0.33% of the samples passed: iteration 1 trains on 1 distinct samples. Pass --min_accepted N "
            "to stop instead when fewer are kept") in select(0)
    assert "⚠️" not in select(5)


@pytest.mark.slow
def test_relaunch_with_changed_heldout_prompts_is_refused_and_figures_record_which_prompts(
        tmp_path, sft_args, eval_prompts):
    from itertrain.data import read_jsonl
    from itertrain.data_lineage import rows_fingerprint

    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text(eval_prompts.read_text())
    out = tmp_path / "exp"
    flags = ("--eval_prompts_file", str(prompts), "--num_generations_eval", "2", "--max_new_tokens", "2")
    r = itertrain("train", *sft_args(out, *flags, iterations=1))
    assert r.returncode == 0, r.output
    (row,) = [json.loads(line) for line in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert row["heldout_prompts"] == rows_fingerprint(read_jsonl(prompts))

    prompts.write_text(prompts.read_text().replace('"prompt": "', '"prompt": "Q: '))
    r = itertrain("train", *sft_args(out, *flags, *RESUME, iterations=2))
    assert r.returncode == 2, r.output
    assert f"--eval_prompts_file {prompts} changed" in r.stderr and "Restore the file" in r.stderr, r.stderr
    assert not (out / "iter_1").exists()
