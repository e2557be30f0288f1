"""Small wrong outcomes, each seen as a user sees it: a DPO iteration none of whose samples was scored,
a finished experiment on a read-only directory, superseded/ in status, an adapter whose base model is
gone, a torn leftover that recovery handles."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from conftest import FAST_FLAGS, itertrain

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")


@pytest.mark.slow
@needs_trl
def test_dpo_whose_reward_function_scores_nothing_says_no_sample_was_scored(tmp_path, tiny_model):
    rng = random.Random(1)
    (tmp_path / "labeled.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
        for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(32))))
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in ((1, 2), (3, 4), (5, 6))))
    (tmp_path / "unscored.py").write_text("def score(prompts, completions, **kwargs):\n"
                                          "    return [None] * len(completions)\n")
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "iterative_dpo",
                  "--train_file", str(tmp_path / "labeled.jsonl"), "--prompts_file", str(tmp_path / "prompts.jsonl"),
                  "--num_iterations", "2", "--samples_per_prompt", "2", "--max_new_tokens", "2",
                  "--reward_fn", "unscored:score", *FAST_FLAGS, cwd=tmp_path)
    assert r.returncode == 1, r.output
    assert "no prompt gave a preference pair (none of the 6 samples was scored: the reward function returned None " \
           "for every one)" in r.stderr, r.output
    assert "min_reward_margin" not in r.stderr, r.output
