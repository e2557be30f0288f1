"""`StrategyContext.encode`: a plug-in sees a prompt's tokens exactly as training and generation do (fast)."""

from __future__ import annotations

from pathlib import Path

from itertrain.data import tokenize_example
from itertrain.strategies import StrategyContext
from itertrain.tiny_model import build_tokenizer


def test_ctx_encode_gives_the_prompt_tokens_training_sees_bos_included():
    tokenizer = build_tokenizer()
    ctx = StrategyContext(cfg=None, root=Path("."), tokenizer=tokenizer, commit_data=None, move_aside=None)
    trained = tokenize_example({"prompt": "12+30=", "completion": "42"}, tokenizer, max_length=64)
    prompt_len = trained["labels"].count(-100)  # the prompt is what the loss skips
    assert ctx.encode("12+30=") == trained["input_ids"][:prompt_len]
    assert ctx.encode("12+30=")[0] == tokenizer.bos_token_id != tokenizer("12+30=")["input_ids"][0]
