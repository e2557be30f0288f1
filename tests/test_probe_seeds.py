"""The curriculum probe samples with its own seeds: never the same draws as its iteration's generation."""

from __future__ import annotations

from pathlib import Path

import pytest

from itertrain.parser import parse_train_args
from itertrain.strategies import StrategyContext
from itertrain.strategies.base import ModelSource
from itertrain.strategies.expert_iteration import ExpertIterationStrategy


def _sample(strategy, model, rows, purpose):
    return strategy.sample(1, ModelSource("base", None, lambda: model), rows, purpose)


@pytest.mark.slow  # real generation on the tiny model
def test_probe_samples_use_their_own_seeds_and_stay_deterministic(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = parse_train_args(["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--strategy",
                            "expert_iteration", "--task", "arithmetic", "--samples_per_prompt", "4",
                            "--temperature", "1.0", "--max_new_tokens", "6", "--disable_tqdm", "true",
                            "--report_to", "none"])
    ctx = StrategyContext(cfg=cfg, root=Path(tmp_path), tokenizer=AutoTokenizer.from_pretrained(tiny_model),
                          commit_data=None, move_aside=None)
    strategy = ExpertIterationStrategy(ctx)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"prompt": f"{a}+{a}="} for a in range(6)]
    generation = _sample(strategy, model, rows, ())
    probe = _sample(strategy, model, rows, ("probe",))
    assert probe != generation
    assert _sample(strategy, model, rows, ("probe",)) == probe
