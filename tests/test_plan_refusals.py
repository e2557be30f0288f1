"""Unit tests of the recovery decision: refusals, fallback, no silent restart, completion,
--iteration_init base, flag parsing, and purity (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from itertrain.errors import RecoveryRefused, UsageError
from itertrain.recovery.discover import Status
from itertrain.recovery.decide import decide
from itertrain.recovery.flags import BASE, RecoveryFlags, parse_resume_from, parse_resume_from_iteration
from itertrain.recovery.plan import Mode, StateScope
from plan_helpers import ckpt, flags, inventory, model, rejected_paths


# --------------------------------------------------------------------------------------------
# explicit values that cannot be used are errors naming what exists


def _small_experiment():
    return inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        ckpt("checkpoint-20", iteration=2),
        ckpt("checkpoint-30", iteration=2, status=Status.TORN),
        ckpt("checkpoint-40", iteration=2, status=Status.CORRUPT),
    )


def test_explicit_missing_checkpoint_is_refused_naming_existing_ones():
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("99", "auto"), _small_experiment())
    msg = str(e.value)
    assert "checkpoint-99" in msg
    assert "checkpoint-20" in msg and "iter_1" in msg


def test_explicit_missing_iteration_model_is_refused_naming_existing_ones():
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("auto", "iter_5"), _small_experiment())
    msg = str(e.value)
    assert "iter_5" in msg
    assert "iter_0" in msg and "iter_1" in msg and "checkpoint-20" in msg


def test_explicit_torn_checkpoint_is_refused_not_replaced_by_another():
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("30", "none"), _small_experiment())
    msg = str(e.value)
    assert "checkpoint-30" in msg and "torn" in msg
    assert "checkpoint-20" in msg


def test_explicit_corrupt_checkpoint_is_refused():
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("40", "auto"), _small_experiment())
    msg = str(e.value)
    assert "checkpoint-40" in msg and "corrupt" in msg
    assert "checkpoint-20" in msg


@pytest.mark.parametrize("status", [Status.TORN, Status.CORRUPT])
def test_explicit_unusable_iteration_model_is_refused(status):
    inv = inventory(model("iter_0", 0), model("iter_1", 1), model("iter_2", 2, status=status))
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("none", "iter_2"), inv)
    msg = str(e.value)
    assert "iter_2" in msg and status.value in msg
    assert "iter_1" in msg


def test_explicit_checkpoint_that_failed_verification_is_refused_without_fallback():
    inv = inventory(model("iter_0", 0), ckpt("checkpoint-20", 1), ckpt("checkpoint-30", 1))
    reason = "verification failed: optimizer.pt xxh3 mismatch"
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("30", "auto"), inv, rejected={"checkpoint-30": reason})
    msg = str(e.value)
    assert "checkpoint-30" in msg and "xxh3 mismatch" in msg
    assert "checkpoint-20" in msg


def test_explicit_iteration_model_that_failed_loading_is_refused_without_fallback():
    inv = inventory(model("iter_0", 0), model("iter_1", 1))
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("none", "iter_1"), inv, rejected={"iter_1": "loading failed on rank 2: bad header"})
    msg = str(e.value)
    assert "iter_1" in msg and "bad header" in msg
    assert "iter_0" in msg


# --------------------------------------------------------------------------------------------
# fallback (auto only)


def test_auto_falls_back_to_next_older_committed_checkpoint_when_newest_is_rejected():
    inv = inventory(ckpt("checkpoint-10", 0), ckpt("checkpoint-20", 0), ckpt("checkpoint-30", 0))
    reason = "verification failed: model.safetensors xxh3 mismatch"
    plan = decide(flags("auto", "auto"), inv, rejected={"checkpoint-30": reason})
    assert plan.weights_from == plan.state_from == "checkpoint-20"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (0, 20)
    assert rejected_paths(plan) == {"checkpoint-30": reason}


def test_auto_falls_back_through_several_rejected_checkpoints_and_lists_them_all():
    inv = inventory(
        model("iter_0", 0), ckpt("checkpoint-10", 1), ckpt("checkpoint-20", 1), ckpt("checkpoint-30", 1)
    )
    rejected = {"checkpoint-30": "verification failed: size", "checkpoint-20": "loading failed on rank 1: EOF"}
    plan = decide(flags("auto", "auto"), inv, rejected=rejected)
    assert plan.state_from == "checkpoint-10"
    assert (plan.iteration, plan.step) == (1, 10)
    assert rejected_paths(plan) == rejected


def test_auto_with_every_checkpoint_rejected_takes_weights_from_newest_iteration_model_with_fresh_state():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-20", 2), ckpt("checkpoint-30", 2))
    rejected = {"checkpoint-30": "verification failed: a", "checkpoint-20": "verification failed: b"}
    plan = decide(flags("auto", "auto"), inv, rejected=rejected)
    assert plan.weights_from == "iter_1"
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (2, 0)
    assert rejected_paths(plan) == rejected


def test_auto_with_rejected_iteration_model_falls_back_to_the_older_one():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), model("iter_2", 2))
    plan = decide(flags("none", "auto"), inv, rejected={"iter_2": "verification failed: shard 3 missing"})
    assert plan.weights_from == "iter_1"
    assert (plan.iteration, plan.step) == (2, 0)
    assert rejected_paths(plan) == {"iter_2": "verification failed: shard 3 missing"}


def test_auto_skips_torn_and_corrupt_checkpoints_and_lists_them_as_rejected():
    inv = inventory(
        model("iter_0", 0),
        ckpt("checkpoint-20", 1),
        ckpt("checkpoint-30", 1, status=Status.TORN),
        ckpt("checkpoint-40", 1, status=Status.CORRUPT),
    )
    plan = decide(flags("auto", "auto"), inv)
    assert plan.state_from == "checkpoint-20"
    assert (plan.iteration, plan.step) == (1, 20)
    rej = rejected_paths(plan)
    assert set(rej) == {"checkpoint-30", "checkpoint-40"}
    assert "torn" in rej["checkpoint-30"]
    assert "corrupt" in rej["checkpoint-40"]


def test_auto_skips_torn_iteration_model_and_lists_it_as_rejected():
    inv = inventory(model("iter_0", 0), model("iter_1", 1, status=Status.TORN))
    plan = decide(flags("auto", "auto"), inv)
    assert plan.weights_from == "iter_0"
    assert (plan.iteration, plan.step) == (1, 0)
    assert "torn" in rejected_paths(plan)["iter_1"]


def test_auto_auto_restores_newer_checkpoint_in_full_when_the_iteration_model_it_started_from_is_corrupt():
    # iter_1 was damaged after iteration 2 had started from it; checkpoint-30 holds the latest weights
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1, status=Status.CORRUPT),
        ckpt("checkpoint-20", iteration=2),
        ckpt("checkpoint-30", iteration=2),
    )
    plan = decide(flags("auto", "auto"), inv)
    assert plan.weights_from == plan.state_from == "checkpoint-30"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (2, 30)
    assert "corrupt" in rejected_paths(plan)["iter_1"]


def test_auto_never_picks_foreign_checkpoint_that_failed_the_structural_check():
    inv = inventory(
        ckpt("checkpoint-10", 0, status=Status.UNVERIFIED, foreign=True),
        ckpt("checkpoint-20", 0, status=Status.INVALID, foreign=True, problem="optimizer.pt is not a zip archive"),
        experiment=False,
    )
    plan = decide(flags("auto", "auto"), inv)
    assert plan.state_from == "checkpoint-10"
    assert "checkpoint-20" in rejected_paths(plan)


# --------------------------------------------------------------------------------------------
# no silent restart


@pytest.mark.parametrize(
    "artifacts",
    [
        (model("iter_0", 0),),
        (ckpt("checkpoint-20", 0),),
    ],
    ids=["committed-iteration", "committed-checkpoint"],
)
def test_none_none_over_committed_progress_is_refused_showing_the_resume_flags(artifacts):
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("none", "none"), inventory(*artifacts))
    msg = str(e.value)
    assert "--resume_from auto --resume_from_iteration auto" in msg
    assert "--overwrite_output_dir" in msg


def test_none_none_with_overwrite_output_dir_starts_fresh_over_committed_progress():
    inv = inventory(model("iter_0", 0), ckpt("checkpoint-20", 1))
    plan = decide(flags("none", "none", overwrite_output_dir=True), inv)
    assert plan.mode == Mode.FRESH
    assert plan.weights_from == BASE
    assert plan.state_from is None
    assert (plan.iteration, plan.step) == (0, 0)


def test_none_none_over_only_torn_artifacts_starts_fresh():
    inv = inventory(ckpt("checkpoint-20", 0, status=Status.TORN))
    plan = decide(flags("none", "none"), inv)
    assert plan.mode == Mode.FRESH
    assert plan.weights_from == BASE


def test_none_none_over_artifacts_of_another_tool_is_refused_not_trained_over():
    # the guide's layout written by its own script: no manifests, but real work
    inv = inventory(
        model("base_model", 0, status=Status.UNVERIFIED, foreign=True),
        ckpt("checkpoint-20", 0, status=Status.UNVERIFIED, foreign=True),
        experiment=False,
    )
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("none", "none"), inv)
    assert "base_model" in str(e.value) and "--resume_from auto --resume_from_iteration auto" in str(e.value)


def test_auto_refuses_to_start_fresh_when_every_committed_candidate_is_rejected():
    inv = inventory(ckpt("checkpoint-10", 0), ckpt("checkpoint-20", 0))
    rejected = {"checkpoint-10": "verification failed: x", "checkpoint-20": "verification failed: y"}
    with pytest.raises(RecoveryRefused) as e:
        decide(flags("auto", "auto"), inv, rejected=rejected)
    msg = str(e.value)
    assert "--overwrite_output_dir" in msg
    assert "checkpoint-20" in msg


# --------------------------------------------------------------------------------------------
# complete


@pytest.mark.parametrize(
    "resume_from, resume_from_iteration", [("none", "auto"), ("auto", "auto"), ("none", "iter_2")]
)
def test_last_iteration_committed_means_experiment_complete(resume_from, resume_from_iteration):
    inv = inventory(
        model("iter_0", 0), model("iter_1", 1), model("iter_2", 2), ckpt("checkpoint-40", iteration=2)
    )
    plan = decide(flags(resume_from, resume_from_iteration, num_iterations=3), inv)
    assert plan.mode == Mode.COMPLETE
    assert plan.iteration == 3
    assert "complete" in plan.reason


def test_raising_num_iterations_continues_a_complete_experiment():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), model("iter_2", 2))
    plan = decide(flags("none", "auto", num_iterations=4), inv)
    assert plan.mode == Mode.ITERATION
    assert plan.weights_from == "iter_2"
    assert (plan.iteration, plan.step) == (3, 0)


# --------------------------------------------------------------------------------------------
# --iteration_init base


def test_iteration_init_base_next_iteration_starts_from_base_weights_with_fresh_state():
    inv = inventory(model("iter_0", 0), model("iter_1", 1))
    plan = decide(flags("none", "auto", iteration_init="base"), inv)
    assert plan.weights_from == BASE
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (2, 0)


def test_iteration_init_base_does_not_carry_optimizer_moments_across_the_boundary():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-40", iteration=1))
    plan = decide(flags("auto", "auto", iteration_init="base"), inv)
    assert plan.weights_from == BASE
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (2, 0)


def test_iteration_init_base_still_continues_an_in_progress_iteration_from_its_checkpoint():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-25", iteration=2))
    plan = decide(flags("auto", "auto", iteration_init="base"), inv)
    assert plan.weights_from == plan.state_from == "checkpoint-25"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (2, 25)


# --------------------------------------------------------------------------------------------
# flag parsing


@pytest.mark.parametrize(
    "value, expected",
    [("auto", "auto"), ("none", "none"), ("AUTO", "auto"), ("20", "20"), ("020", "20"), ("0", "0")],
)
def test_parse_resume_from_accepts_auto_none_and_step_numbers(value, expected):
    assert parse_resume_from(value) == expected


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "checkpoint-20", "iter_1"])
def test_parse_resume_from_rejects_anything_else_with_usage_error_listing_accepted_forms(value):
    with pytest.raises(UsageError) as e:
        parse_resume_from(value)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "auto" in msg and "none" in msg


@pytest.mark.parametrize(
    "value, expected",
    [("auto", "auto"), ("none", "none"), ("iter_0", "iter_0"), ("iter_2", "iter_2"), ("iter_02", "iter_2")],
)
def test_parse_resume_from_iteration_accepts_auto_none_and_iter_k(value, expected):
    assert parse_resume_from_iteration(value) == expected


@pytest.mark.parametrize("value", ["iter_x", "../x", "iter_", "2", "iter_-1", "", "iter_1/checkpoint-20"])
def test_parse_resume_from_iteration_rejects_anything_else_with_usage_error(value):
    with pytest.raises(UsageError) as e:
        parse_resume_from_iteration(value)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "auto" in msg and "iter_" in msg


@pytest.mark.parametrize("kw", [{"resume_from": "abc"}, {"resume_from_iteration": "../x"}])
def test_recovery_flags_reject_invalid_values_at_construction(kw):
    with pytest.raises(UsageError):
        RecoveryFlags(**kw)


# --------------------------------------------------------------------------------------------
# purity


def test_plan_module_and_these_tests_do_not_import_torch():
    here = Path(__file__).resolve().parent
    code = (
        "import sys, importlib.util\n"
        "import itertrain.recovery.decide\n"
        "assert 'torch' not in sys.modules, 'itertrain.recovery.decide imported torch'\n"
        f"sys.path.insert(0, {str(here)!r})\n"
        "for name in ('test_plan_table', 'test_plan_refusals'):\n"
        f"    spec = importlib.util.spec_from_file_location(name, {str(here)!r} + '/' + name + '.py')\n"
        "    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "    assert 'torch' not in sys.modules, name + ' imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=here.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_iteration_init_base_never_reports_both_when_nothing_comes_from_the_checkpoint():
    inv = inventory(model("iter_0", 0), ckpt("checkpoint-12", iteration=0))
    plan = decide(flags("auto", "auto", iteration_init="base"), inv)
    assert plan.mode == Mode.ITERATION and plan.state_from is None and plan.weights_from == BASE
    assert plan.previous_model == "iter_0"  # the data of iteration 1 still comes from iter_0


def test_explicit_older_iteration_supersedes_later_models_data_and_checkpoints():
    from itertrain.recovery.discover import DataArtifact

    inv = inventory(model("iter_0", 0), model("iter_1", 1), model("iter_2", 2), ckpt("iter_2/checkpoint-12", 2),
                    ckpt("checkpoint-8", iteration=3), DataArtifact("data/iter_2", 2, Status.COMMITTED),
                    DataArtifact("data/iter_3", 3, Status.COMMITTED))
    plan = decide(flags("none", "iter_1"), inv)
    assert (plan.mode, plan.iteration, plan.weights_from) == (Mode.ITERATION, 2, "iter_1")
    assert set(plan.supersedes) == {"iter_2", "data/iter_3", "checkpoint-8"}  # data/iter_2 is checked by lineage
    assert any("replaces later work" in w for w in plan.warnings)


def test_rejected_iteration_model_makes_its_final_checkpoint_the_newest_candidate_again():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-8", 1), ckpt("checkpoint-12", 1))
    plan = decide(flags("auto", "auto"), inv, {"iter_1": "verification failed: model.safetensors checksum mismatch"})
    assert (plan.mode, plan.state_from, plan.iteration, plan.step) == (Mode.CHECKPOINT, "checkpoint-12", 1, 12)
    assert plan.previous_model == "iter_0" and "iter_1" in rejected_paths(plan)
