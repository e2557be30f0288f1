"""LoRA without training: the flags (TRL's names and defaults, checks), the experiment record, and the pure
recovery decision with adapters (what the adapter applies to, where its weights come from, when optimizer
moments carry). No processes, no disk beyond tmp_path."""

from __future__ import annotations

import sys

import pytest

from itertrain.errors import RecoveryRefused, UsageError
from itertrain.experiment import check_resume, new_record
from itertrain.lora import peft_target_modules
from itertrain.parser import parse_train_args
from itertrain.recovery.decide import decide
from itertrain.recovery.flags import BASE
from itertrain.recovery.plan import Mode, StateScope
from plan_helpers import ckpt, flags, inventory, model, rejected_paths


@pytest.fixture
def argv(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')

    def make(*extra: str) -> list[str]:
        return ["--model_name", str(d), "--output_dir", str(tmp_path / "out"), "--train_file", str(data), *extra]

    return make


# ---- flags -----------------------------------------------------------------------------------------
def test_lora_flags_have_trls_names_and_defaults_and_target_all_linear_layers_by_default(argv):
    lora = parse_train_args(argv("--use_peft")).lora
    assert (lora.use_peft, lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (True, 16, 32, 0.05)
    assert lora.lora_target_modules == ["all-linear"] and lora.iteration_model == "merged"
    assert parse_train_args(argv()).lora.use_peft is False


def test_lora_flags_are_their_own_group_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    out = capsys.readouterr().out
    group = out[out.index("LoRA (PEFT adapters"):out.index("Hugging Face TrainingArguments")]
    for flag in ("--use_peft", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules", "--iteration_model"):
        assert flag in group


def test_one_module_name_stays_a_name_while_all_linear_and_a_regex_stay_strings():
    # TRL collapses any one-item list into a string, which PEFT then matches as a regex against the full path.
    assert peft_target_modules(["q_proj"]) == ["q_proj"]
    assert peft_target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert peft_target_modules(["ALL-LINEAR"]) == "all-linear"
    assert peft_target_modules([r".*\.q_proj"]) == r".*\.q_proj"


@pytest.mark.parametrize("extra,message", [
    (("--iteration_model", "adapter"), "--iteration_model adapter describes LoRA iteration models: add --use_peft"),
    (("--use_peft", "--lora_r", "0"), "--lora_r 0: the LoRA rank must be at least 1"),
    (("--use_peft", "--lora_dropout", "1.5"), r"--lora_dropout 1.5: must be in \[0, 1\)"),
    (("--use_peft", "--lora_target_modules", "all-linear", "q_proj"), "all-linear or a regular expression must be"),
])
def test_invalid_lora_flags_are_usage_errors(argv, extra, message):
    with pytest.raises(UsageError, match=message):
        parse_train_args(argv(*extra))


def test_use_peft_without_peft_installed_names_the_extra(argv, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'itertrain\[lora\]'") as e:
        parse_train_args(argv("--use_peft"))
    assert e.value.exit_code == 2


def test_lora_settings_define_the_experiment_and_are_not_recorded_without_use_peft(argv, tmp_path):
    plain = parse_train_args(argv())
    assert "lora_r" not in new_record(plain, tmp_path)["arguments"]  # records from before LoRA stay comparable
    record = new_record(parse_train_args(argv("--use_peft")), tmp_path)
    with pytest.raises(RecoveryRefused, match="lora_r: 16 -> 8"):
        check_resume(record, parse_train_args(argv("--use_peft", "--lora_r", "8")))
    with pytest.raises(RecoveryRefused, match="use_peft: True -> None"):
        check_resume(record, plain)
    assert check_resume(record, parse_train_args(argv("--use_peft", "--lora_r", "8", "--allow_config_change")))


# ---- the decision ------------------------------------------------------------------------------------
def test_merged_mode_never_carries_optimizer_moments_into_a_fresh_adapter_and_says_so():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("iter_1/checkpoint-12", iteration=1))
    full_ft = decide(flags("auto", "auto"), inv)
    assert full_ft.state_scope == StateScope.OPTIMIZER  # without LoRA the moments carry
    plan = decide(flags("auto", "auto", lora="merged"), inv)
    assert (plan.mode, plan.state_from, plan.state_scope) == (Mode.ITERATION, None, StateScope.NONE)
    assert (plan.adapter_base, plan.adapter_from, plan.weights_from) == ("iter_1", None, "iter_1")
    assert "trains a fresh adapter on it, so its optimizer moments start fresh" in plan.reason
    assert "iter_1/checkpoint-12 is not used" in plan.reason


def test_adapter_mode_continues_the_adapter_of_the_previous_iteration_on_the_base_with_its_moments():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("iter_1/checkpoint-12", iteration=1))
    plan = decide(flags("auto", "auto", lora="adapter"), inv)
    assert (plan.mode, plan.state_from, plan.state_scope) == (Mode.BOTH, "iter_1/checkpoint-12", StateScope.OPTIMIZER)
    assert (plan.adapter_base, plan.adapter_from) == (BASE, "iter_1")
    assert plan.to_verify == ("iter_1", "iter_1/checkpoint-12")


def test_adapter_mode_under_iteration_init_base_starts_a_fresh_adapter_on_the_base():
    inv = inventory(model("iter_0", 0), ckpt("iter_0/checkpoint-12", iteration=0))
    plan = decide(flags("auto", "auto", lora="adapter", iteration_init="base"), inv)
    assert (plan.adapter_base, plan.adapter_from, plan.state_scope) == (BASE, None, StateScope.NONE)


@pytest.mark.parametrize("mode,base", [("merged", "iter_1"), ("adapter", BASE)])
def test_a_restored_lora_checkpoint_supplies_the_adapter_on_the_model_its_iteration_started_from(mode, base):
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-8", iteration=2))
    plan = decide(flags("auto", "auto", lora=mode), inv)
    assert (plan.mode, plan.weights_from, plan.state_scope) == (Mode.CHECKPOINT, "checkpoint-8", StateScope.FULL)
    assert (plan.adapter_base, plan.adapter_from) == (base, "checkpoint-8")
    assert "iter_1" in plan.to_verify or base == BASE  # merged: the model under the adapter is verified too


def test_merged_checkpoint_whose_start_model_is_gone_is_rejected_and_the_next_candidate_used():
    # iter_1 is damaged: checkpoint-8 of iteration 2 is an adapter for iter_1 and useless without it.
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-8", iteration=2),
                    ckpt("iter_0/checkpoint-12", iteration=0))
    plan = decide(flags("auto", "auto", lora="merged"), inv, {"iter_1": "model.safetensors checksum mismatch"})
    assert rejected_paths(plan)["checkpoint-8"].startswith("a LoRA adapter trained on iter_1")
    assert (plan.mode, plan.iteration, plan.adapter_base, plan.adapter_from) == (Mode.ITERATION, 1, "iter_0", None)
    full_ft = decide(flags("auto", "auto"), inv, {"iter_1": "model.safetensors checksum mismatch"})
    assert full_ft.state_from == "checkpoint-8"  # full weights: the checkpoint alone suffices


def test_explicit_merged_checkpoint_without_its_start_model_is_refused_naming_it():
    inv = inventory(model("iter_0", 0), ckpt("checkpoint-8", iteration=2))
    with pytest.raises(RecoveryRefused, match="checkpoint-8 is a LoRA adapter trained on iter_1"):
        decide(flags("8", "auto", lora="merged"), inv)


def test_scenario_5_with_lora_takes_iter_k_and_the_checkpoints_state_onto_a_fresh_or_continued_adapter():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-8", iteration=2))
    merged = decide(flags("8", "iter_1", lora="merged"), inv)
    assert (merged.weights_override, merged.adapter_base, merged.adapter_from) == (True, "iter_1", None)
    adapter = decide(flags("8", "iter_1", lora="adapter"), inv)
    assert (adapter.adapter_base, adapter.adapter_from, adapter.state_from) == (BASE, "iter_1", "checkpoint-8")


# ---- the reference from an adapter to its model (files only, no torch) ----------------------------------
def _artifact(directory, *, lineage=None, weights=b"weights", kind="trainer_checkpoint"):
    from itertrain.artifacts.manifest import commit_directory

    directory.mkdir(parents=True)
    (directory / ("adapter_model.safetensors" if kind == "trainer_checkpoint" else "model.safetensors")).write_bytes(weights)
    commit_directory(directory, kind=kind, iteration=0, step=0, lineage=lineage or {}, fsync=False)


def test_an_adapter_whose_model_changed_is_rejected_and_a_changed_base_is_refused_naming_it(tmp_path):
    from itertrain.lora.links import check_links, link_record
    from itertrain.recovery.plan import RecoveryPlan

    root, base = tmp_path / "exp", tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    _artifact(root / "iter_0", kind="iteration_model")
    merged_link = link_record(root, "iter_0", str(base))
    _artifact(root / "checkpoint-4", lineage={"adapter_of": merged_link})
    _artifact(root / "checkpoint-8", lineage={"adapter_of": link_record(root, BASE, str(base))})
    merged = RecoveryPlan(mode=Mode.CHECKPOINT, iteration=1, step=4, weights_from="checkpoint-4", reason="",
                          lora="merged", adapter_base="iter_0", adapter_from="checkpoint-4")
    adapter = merged.with_(lora="adapter", adapter_base=BASE, adapter_from="checkpoint-8", weights_from="checkpoint-8")
    assert check_links(root, merged, str(base)) == {} and check_links(root, adapter, str(base)) == {}
    moved = tmp_path / "moved"  # the same weights in another place: the reference holds (content, not path)
    moved.mkdir()
    (moved / "model.safetensors").write_bytes(b"base weights")
    assert check_links(root, adapter, str(moved)) == {}

    (root / "iter_0" / "itertrain.manifest.json").unlink()  # iter_0 replaced by other weights
    (root / "iter_0" / "model.safetensors").write_bytes(b"other weights")
    failures = check_links(root, merged, str(base))
    assert "its LoRA adapter applies to iter_0, whose weights changed since it was trained" in failures["checkpoint-4"]
    (base / "model.safetensors").write_bytes(b"changed base")
    with pytest.raises(RecoveryRefused, match=f"checkpoint-8 is a LoRA adapter of the base model {base.resolve()}"):
        check_links(root, adapter, str(base))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="--fsdp is refused on CPU before this check")
def test_lora_with_fsdp_is_refused_before_training(argv):
    with pytest.raises(UsageError, match="--use_peft with --fsdp or --deepspeed is not supported"):
        parse_train_args(argv("--use_peft", "--fsdp", "full_shard"))
