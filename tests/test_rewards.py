"""Reward functions in both forms (per sample, and batched as TRL's GRPOTrainer calls them) and the
`--reward_model` scorer, in one process."""

from __future__ import annotations

import pytest

from itertrain.errors import RewardFunctionError, UsageError
from itertrain.rewards import RewardFunction, RewardModel, check_reward, load_reward_fn

ROWS = [{"prompt": "1+1=", "answer": "2", "level": 1}, {"prompt": "2+2=", "answer": "4", "level": 2}]
COMPLETIONS = [["2", "3"], ["4", "x", "5"]]


def test_trl_style_batched_function_gets_prompts_completions_ids_and_row_columns_as_lists():
    seen = {}

    def reward(prompts, completions, **kwargs):  # the form TRL documents: everything else by keyword
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [float(c == a) for c, a in zip(completions, kwargs["answer"])]

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(ch) for ch in text]}

    fn = RewardFunction(reward, "t:reward", batched=True)
    assert fn.score(ROWS, COMPLETIONS, CharTokenizer()) == [[1.0, 0.0], [1.0, 0.0, 0.0]]
    assert seen["prompts"] == ["1+1=", "1+1=", "2+2=", "2+2=", "2+2="]
    assert seen["completions"] == ["2", "3", "4", "x", "5"]
    assert seen["completion_ids"] == [[50], [51], [52], [120], [53]]
    assert seen["answer"] == ["2", "2", "4", "4", "4"] and seen["level"] == [1, 1, 2, 2, 2]
    assert seen["trainer_state"] is None
    seen["log_metric"]("x", 1.0)  # accepted and ignored, as TRL's are outside a Trainer
    seen["log_extra"]("x", [1])


def test_form_is_told_from_the_signature_or_the_marker():
    def per_sample(prompt, completion, answer):
        return 1.0

    def trl_form(completions, **kwargs):
        return [1.0] * len(completions)

    def marked(*args, **kwargs):
        return [0.5] * len(kwargs["completions"])

    marked.batched = True
    assert not RewardFunction(per_sample, "p", False).batched
    for fn, batched in ((per_sample, False), (trl_form, True), (marked, True)):
        from itertrain.rewards import _is_batched

        assert _is_batched(fn) is batched, fn.__name__
    assert RewardFunction(marked, "m", True).score(ROWS, COMPLETIONS) == [[0.5, 0.5], [0.5, 0.5, 0.5]]


def test_none_means_not_scored_and_a_wrong_count_is_an_error():
    fn = RewardFunction(lambda prompts, completions, **kw: [None, 1, 0, True, 2.5], "n", batched=True)
    assert fn.score(ROWS, COMPLETIONS) == [[None, 1.0], [0.0, 1.0, 2.5]]
    short = RewardFunction(lambda prompts, completions, **kw: [1.0], "s", batched=True)
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 5 completions"):
        short.score(ROWS, COMPLETIONS)


def test_a_failing_reward_function_is_a_usage_error_at_launch_naming_it(tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text("def score(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"--reward_funcs bad_reward:score failed the launch check \(2 prompts x 4 "
                                         r"samples\).*raised KeyError"):
        check_reward(load_reward_fn("bad_reward:score"), ROWS)


@pytest.mark.parametrize("returns,expected", [
    # one reward per prompt instead of one per completion: only a batch of several prompts x samples shows it
    ("[1.0 for _ in set(prompts)]", r"failed the launch check \(2 prompts x 3 samples\): reward function r:fn "
                                    r"returned 2 rewards for 6 completions"),
    ("['yes' if c else 0.0 for c in completions]", r"returned 'yes' \(str, not a number\) for 4 of 6 completions at launch"),
    ("[float('nan')] * len(completions)", r"returned nan \(float, not finite\) for 6 of 6 completions"),
    ("[None] * len(completions)", r"returned None \(not scored\) for all 6 completions"),
])
def test_launch_check_names_what_a_batched_reward_returned_for_how_many_completions(returns, expected):
    fn = eval(f"lambda prompts, completions, **kwargs: {returns}")
    with pytest.raises(UsageError, match=r"^--reward_funcs r:fn .*" + expected):
        check_reward(RewardFunction(fn, "r:fn", batched=True), ROWS, samples_per_prompt=3)


def test_launch_check_passes_a_reward_that_scores_some_and_leaves_others_unscored():
    from itertrain.rewards import check_reward_function

    seen = {}

    def reward(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, answer=answer)
        return [1.0 if c == a else None for c, a in zip(completions, answer)]

    check_reward_function(reward, ["1+1=", "2+2="], [["2", ""], ["4", "x"]], answer=["2", "4"])
    assert seen == {"prompts": ["1+1=", "1+1=", "2+2=", "2+2="], "answer": ["2", "2", "4", "4"]}


def make_reward_model(directory, num_labels: int = 1):
    """A tiny sequence classifier with the character tokenizer, created locally."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from itertrain.tiny_model import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return make_reward_model(tmp_path_factory.mktemp("rm") / "reward-model")


def test_reward_model_scores_prompt_plus_completion_the_same_in_any_batch(reward_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    batched = RewardModel(str(reward_model), batch_size=4).score(ROWS, COMPLETIONS, sharded=False)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tok = AutoTokenizer.from_pretrained(reward_model)
    with torch.no_grad():
        alone = [[model(**tok(row["prompt"] + c, return_tensors="pt")).logits[0, 0].item() for c in outs]
                 for row, outs in zip(ROWS, COMPLETIONS)]
    assert [len(r) for r in batched] == [2, 3]
    assert [v for r in batched for v in r] == pytest.approx([v for r in alone for v in r], abs=1e-5)
    assert len({round(v, 6) for r in batched for v in r}) == 5  # a real model: the texts get different scores


def test_a_reward_model_with_several_labels_is_refused(tmp_path):
    with pytest.raises(UsageError, match="has 3 labels; a reward model has one"):
        RewardModel(str(make_reward_model(tmp_path / "rm3", num_labels=3))).load()


def test_an_infinite_reward_is_refused_naming_the_function_so_samples_json_stays_standard():
    fn = RewardFunction(lambda prompts, completions, **kw: [1.0, float("inf"), 0, 0, 0], "m:inf", batched=True)
    with pytest.raises(RewardFunctionError, match=r"m:inf returned inf .* it must return a finite number or None"):
        fn.score(ROWS, COMPLETIONS)


@pytest.mark.parametrize("make", [
    lambda np, torch: [np.float32(0.5), np.int64(2), np.bool_(True), torch.tensor(0.25), None],
    lambda np, torch: torch.tensor([0.5, 2.0, 1.0, 0.25, 0.0]),  # a 1-d tensor as the whole return
    lambda np, torch: np.array([0.5, 2.0, 1.0, 0.25, 0.0], dtype=np.float32),
], ids=["numpy_and_0d_tensor_scalars", "1d_tensor", "1d_ndarray"])
def test_numpy_and_torch_rewards_are_accepted_at_launch_and_scored_as_the_same_floats(make):
    import numpy as np
    import torch

    from itertrain.rewards import check_reward_function

    fn = RewardFunction(lambda prompts, completions, **kw: make(np, torch), "m:np", batched=True)
    check_reward_function(fn, [r["prompt"] for r in ROWS], COMPLETIONS, answer=[r["answer"] for r in ROWS])
    got = fn.score(ROWS, COMPLETIONS)
    assert got[0] == [0.5, 2.0] and got[1][:2] == [1.0, 0.25] and all(type(v) is float for v in got[0])
    per_sample = RewardFunction(lambda prompt, completion, answer: np.float32(completion == answer), "m:one", False)
    assert per_sample.score(ROWS, COMPLETIONS) == [[1.0, 0.0], [1.0, 0.0, 0.0]]


def test_launch_check_says_one_prompt_and_why_a_value_is_not_a_reward():
    fn = RewardFunction(lambda prompts, completions, **kw: [2.0, "x"], "m:s", batched=True)
    with pytest.raises(UsageError, match=r"returned 'x' \(str, not a number\) for 1 of 2 completions at launch "
                                         r"\(1 prompt x 2 samples\)"):
        check_reward(fn, ROWS[:1], samples_per_prompt=2)


def test_no_pairs_is_explained_by_what_happened_to_the_rewards():
    from itertrain.rewards import why_no_pairs

    why, advice = why_no_pairs([{"reward": None}] * 6, 0.1)
    assert why == "none of the 6 samples was scored: the reward function returned None for every one"
    assert advice.startswith("Make the reward function return a number")
    why, advice = why_no_pairs([{"reward": 1.0}, {"reward": 1.0}, {"reward": None}], 0.1)
    assert why == "every prompt's scored samples were within --min_reward_margin 0.1 of each other"
