"""Unit tests of flag parsing (no prefix matching, YAML keys checked, groups in --help) and of the
strategy registry (built in, registered, module:Class, entry points, refusals)."""

from __future__ import annotations

import re
import importlib.util
import sys
import textwrap

import pytest

from itertrain import Strategy, register_strategy
from itertrain.errors import UsageError
from itertrain.parser import parse_train_args
from itertrain.strategies import available, load_strategy

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")


def base(model_dir, tmp_path, *extra):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    return ["--model_name", str(model_dir), "--output_dir", str(tmp_path / "out"), "--train_file", str(data), *extra]


def test_a_flag_prefix_is_refused_not_guessed(model_dir, tmp_path):
    with pytest.raises(UsageError, match="unrecognized arguments: --max_step 10"):
        parse_train_args(base(model_dir, tmp_path, "--max_step", "10"))


def test_a_yaml_key_that_is_not_exactly_a_flag_is_refused_with_a_hint(model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_step: 10\nlearning_rate: 1e-3\n")
    with pytest.raises(UsageError, match=r"unknown key\(s\) max_step \(did you mean max_steps\?\)"):
        parse_train_args(["--config", str(cfg), *base(model_dir, tmp_path)])


def test_yaml_values_are_typed_and_the_command_line_wins(model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 10\nlearning_rate: 1e-3\nnum_iterations: 3\nreport_to: [none]\n")
    run = parse_train_args(["--config", str(cfg), *base(model_dir, tmp_path, "--max_steps", "7")])
    assert (run.training.max_steps, run.training.learning_rate, run.loop.num_iterations) == (7, 1e-3, 3)


def test_help_lists_itertrain_groups_before_hugging_face_and_names_the_strategies(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_train_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    titles = ["recovery (the guide's flags):", "model:", "iteration loop:", "generation and reward",
              "Hugging Face TrainingArguments (all pass through)"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions), positions
    assert "--config FILE.yaml" in out and "Available: sft, expert_iteration" in out


def test_unknown_strategy_exits_2_listing_the_choices(model_dir, tmp_path):
    with pytest.raises(UsageError) as e:
        parse_train_args(base(model_dir, tmp_path, "--strategy", "dpo"))
    assert e.value.exit_code == 2
    assert "invalid choice" in str(e.value) and "sft, expert_iteration" in str(e.value)


def test_strategy_by_module_and_class_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "mystrats.py").write_text(textwrap.dedent("""
        from itertrain import Strategy
        class Tiny(Strategy):
            def train_rows(self, iteration):
                return [{"text": "hello"}]
        class NotAStrategy:
            pass
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cls = load_strategy("mystrats:Tiny")
    assert issubclass(cls, Strategy) and cls.name == "mystrats:Tiny"
    with pytest.raises(UsageError, match="is not a subclass of itertrain.Strategy"):
        load_strategy("mystrats:NotAStrategy")
    with pytest.raises(UsageError, match="has no attribute 'Missing'"):
        load_strategy("mystrats:Missing")
    with pytest.raises(UsageError, match="cannot import no_such_module"):
        load_strategy("no_such_module:X")


def test_register_strategy_makes_a_name_available():
    @register_strategy("unit_test_strategy")
    class Mine(Strategy):
        def train_rows(self, iteration):
            return [{"text": "x"}]

    assert load_strategy("unit_test_strategy") is Mine
    assert "unit_test_strategy" in available()
    with pytest.raises(UsageError):
        register_strategy("bad", object)  # type: ignore[arg-type]


def test_register_strategy_refuses_a_taken_name_unless_replace_is_said():
    class Other(Strategy):
        def train_rows(self, iteration):
            return [{"text": "y"}]

    with pytest.raises(UsageError, match=r"the name 'sft' is taken \(built in: itertrain.strategies.sft:SFTStrategy\)"):
        register_strategy("sft", Other)
    assert load_strategy("sft").__name__ == "SFTStrategy"

    class First(Strategy):
        def train_rows(self, iteration):
            return [{"text": "x"}]

    register_strategy("unit_test_taken", First)
    register_strategy("unit_test_taken", First)  # the same class again (a module run twice): no change
    with pytest.raises(UsageError, match="taken \\(registered: .*First\\); .*replace=True"):
        register_strategy("unit_test_taken", Other)
    assert load_strategy("unit_test_taken") is First
    register_strategy("unit_test_taken", Other, replace=True)
    assert load_strategy("unit_test_taken") is Other


def test_strategy_from_an_installed_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "epstrat"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from itertrain import Strategy\nclass EP(Strategy):\n"
                                     "    def train_rows(self, iteration):\n        return [{'text': 'x'}]\n")
    dist = site / "epstrat-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epstrat\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[itertrain.strategies]\nfrom_entry_point = epstrat:EP\n")
    monkeypatch.syspath_prepend(str(site))
    assert available()["from_entry_point"] == "entry point epstrat:EP"
    assert load_strategy("from_entry_point").__name__ == "EP"


def test_a_strategy_that_needs_a_train_file_says_so(model_dir, tmp_path):
    with pytest.raises(UsageError, match="--strategy sft needs --train_file"):
        parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--strategy expert_iteration needs --task arithmetic"):
        parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"),
                          "--strategy", "expert_iteration"])


def test_output_dir_that_is_a_file_is_a_usage_error(model_dir, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    args = base(model_dir, tmp_path)
    args[args.index("--output_dir") + 1] = str(f)
    with pytest.raises(UsageError, match="is a file, not a directory"):
        parse_train_args(args)


def test_trl_flag_names_are_canonical_in_help_and_the_old_names_still_parse(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--strategy", "expert_iteration", "--help"])
    out = capsys.readouterr().out
    for canonical, old in (("model_name_or_path", "model_name"), ("num_generations", "samples_per_prompt"),
                           ("max_completion_length", "max_new_tokens"), ("reward_funcs", "reward_fn"),
                           ("dtype", "model_dtype"), ("max_length", "max_seq_length")):
        assert f"\n  --{canonical} " in out, canonical
        assert f"\n  --{old} " not in out and f"Alias: --{old}." in " ".join(out.split()), old
    assert "--max-steps" not in out  # one name per option: HF's dashed spelling parses but is not listed
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    common = ["--output_dir", str(tmp_path / "out"), "--train_file", str(data), "--strategy", "expert_iteration",
              "--prompts_file", str(data)]
    old = parse_train_args(["--model_name", str(model_dir), "--samples_per_prompt", "3", "--max_new_tokens", "5",
                            "--model_dtype", "bfloat16", "--max_seq_length", "64", *common])
    new = parse_train_args(["--model_name_or_path", str(model_dir), "--num_generations", "3",
                            "--max_completion_length", "5", "--dtype", "bfloat16", "--max_length", "64", *common])
    for run in (old, new):
        assert (run.model.model_name, run.generation.samples_per_prompt, run.generation.max_new_tokens,
                run.model.model_dtype, run.loop.max_seq_length) == (str(model_dir), 3, 5, "bfloat16", 64)


def test_yaml_accepts_old_and_trl_keys_but_refuses_both_for_one_setting(model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {model_dir}\nmax_seq_length: 32\n")
    run = parse_train_args(["--config", str(cfg), *base(model_dir, tmp_path)[2:]])
    assert (run.model.model_name, run.loop.max_seq_length) == (str(model_dir), 32)
    cfg.write_text(f"model_name_or_path: {model_dir}\nmodel_name: {model_dir}\n")
    with pytest.raises(UsageError, match="model_name and model_name_or_path name the same setting"):
        parse_train_args(["--config", str(cfg), *base(model_dir, tmp_path)[2:]])


def test_old_and_trl_flag_names_of_one_setting_on_the_command_line_are_refused_but_one_flag_twice_is_last_wins(
        model_dir, tmp_path):
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"^--model_name and --model_name_or_path name the same setting; keep "
                                         r"--model_name_or_path \(TRL's name\)"):
        parse_train_args(base(model_dir, tmp_path, "--model_name_or_path", str(other)))
    with pytest.raises(UsageError, match=r"^--samples_per_prompt and --num_generations name the same setting"):
        parse_train_args(base(model_dir, tmp_path, "--samples-per-prompt", "2", "--num_generations=4"))
    run = parse_train_args(base(model_dir, tmp_path, "--model_name", str(other)))
    assert run.model.model_name == str(other)


@pytest.mark.parametrize("extra,expected", [
    (("--reward_threshold", "nan"), "--reward_threshold nan: must be a finite number, not nan"),
    (("--reward_threshold=-inf",), "--reward_threshold -inf: must be a finite number"),
    pytest.param(("--strategy", "grpo", "--beta", "inf"), "--beta inf: must be a finite number", marks=needs_trl),
    pytest.param(("--strategy", "grpo", "--reward_funcs", "m:a", "m:b", "--reward_weights", "1", "nan"),
                 "--reward_weights [1.0, nan]: must be a finite number, not nan", marks=needs_trl),
    pytest.param(("--strategy", "iterative_dpo", "--min_reward_margin", "inf"),
                 "--min_reward_margin inf: must be a finite", marks=needs_trl),
], ids=["threshold_nan", "threshold_-inf", "beta", "reward_weights", "min_reward_margin"])
def test_a_non_finite_number_for_a_float_flag_exits_2_naming_the_flag(model_dir, tmp_path, extra, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(UsageError, match="^" + re.escape(expected)):
        parse_train_args(base(model_dir, tmp_path, "--prompts_file", str(prompts), *extra))


def test_dataset_config_without_dataset_name_exits_2(model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"^--dataset_config en without --dataset_name"):
        parse_train_args(base(model_dir, tmp_path, "--dataset_config", "en"))


def test_a_missing_model_names_the_trl_flag(tmp_path):
    with pytest.raises(UsageError, match=r"^--model_name_or_path .* does not exist"):
        parse_train_args(["--model_name", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"),
                          "--train_file", str(tmp_path)])


def test_reward_funcs_takes_one_function_for_every_strategy_and_refuses_several_where_one_scores(model_dir,
                                                                                               tmp_path):
    from itertrain.rewards import reward_scorer

    common = reward_args(model_dir, tmp_path)
    one = parse_train_args([*common, "--strategy", "expert_iteration", "--reward_funcs", "m:f"])
    assert one.generation.reward_fn == "m:f"  # a string, as itertrain.json has always held it
    assert parse_train_args([*common, "--strategy", "expert_iteration", "--reward_fn", "m:f"]).generation.reward_fn \
        == "m:f"
    several = parse_train_args([*common, "--strategy", "expert_iteration", "--reward_funcs", "m:f", "m:g"])
    with pytest.raises(UsageError, match="several reward functions are combined by --strategy grpo and rloo"):
        reward_scorer(several.generation, several.model)


@needs_trl
def test_grpo_takes_several_reward_funcs_from_the_command_line_or_yaml_each_a_module_function(model_dir, tmp_path):
    common = reward_args(model_dir, tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("reward_funcs: [m:f, m:g]\nreward_weights: [1.0, 0.5]\n")
    grpo = parse_train_args([*common, "--strategy", "grpo", "--config", str(cfg)])
    assert grpo.generation.reward_fn == ["m:f", "m:g"] and list(grpo.training.reward_weights) == [1.0, 0.5]
    with pytest.raises(UsageError, match="--reward_funcs 'g': expected module:function"):
        parse_train_args([*common, "--strategy", "grpo", "--reward_funcs", "m:f", "g"])


def reward_args(model_dir, tmp_path) -> list[str]:
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"), "--prompts_file",
            str(data), "--train_file", str(data)]
