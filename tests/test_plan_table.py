"""Unit tests of the recovery decision table, the guide's scenarios 1-5, ordering and rule 4.

`decide(flags, inventory, rejected)` is pure: every inventory here is built directly from the
discover() dataclasses (tests/plan_helpers.py), with relative paths as discover() produces them.
No torch, no disk.
"""

from __future__ import annotations

import pytest

from itertrain.recovery.discover import Status
from itertrain.recovery.decide import decide
from itertrain.recovery.flags import BASE, RecoveryFlags
from itertrain.recovery.plan import Mode, StateScope
from plan_helpers import ckpt, flags, inventory, model


# --------------------------------------------------------------------------------------------
# The decision table, one test per row


def test_row1_none_none_on_empty_dir_trains_from_scratch():
    plan = decide(flags("none", "none"), inventory())
    assert plan.mode == Mode.FRESH
    assert plan.weights_from == BASE
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (0, 0)


@pytest.mark.parametrize("resume_from", ["auto", "30"])
def test_row2_checkpoint_only_fully_restores_it_and_continues_its_iteration_at_its_step(resume_from):
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        ckpt("checkpoint-10", iteration=2),
        ckpt("checkpoint-30", iteration=2),
    )
    plan = decide(flags(resume_from, "none"), inv)
    assert plan.mode == Mode.CHECKPOINT
    assert plan.weights_from == "checkpoint-30"
    assert plan.state_from == "checkpoint-30"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (2, 30)


@pytest.mark.parametrize("resume_from_iteration", ["auto", "iter_1"])
def test_row3_iteration_model_only_gives_its_weights_fresh_state_and_runs_the_next_iteration(resume_from_iteration):
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        ckpt("checkpoint-20", iteration=2),  # present, but --resume_from none: not used
    )
    plan = decide(flags("none", resume_from_iteration), inv)
    assert plan.mode == Mode.ITERATION
    assert plan.weights_from == "iter_1"
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (2, 0)


@pytest.mark.parametrize(
    "resume_from, resume_from_iteration",
    [("auto", "auto"), ("40", "auto"), ("auto", "iter_1"), ("40", "iter_1")],
)
def test_row4_newer_iteration_model_gives_weights_and_older_checkpoint_only_optimizer_moments(
    resume_from, resume_from_iteration
):
    # crash between committing iter_1 and cleaning up its checkpoints: checkpoint-40 is stale
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-40", iteration=1))
    plan = decide(flags(resume_from, resume_from_iteration), inv)
    assert plan.mode == Mode.BOTH
    assert plan.weights_from == "iter_1"
    assert plan.state_from == "checkpoint-40"
    assert plan.state_scope == StateScope.OPTIMIZER
    assert (plan.iteration, plan.step) == (2, 0)


@pytest.mark.parametrize(
    "resume_from, resume_from_iteration",
    [("auto", "auto"), ("25", "auto"), ("auto", "iter_1")],
)
def test_row5_newer_checkpoint_with_an_auto_flag_gives_weights_and_full_state_and_says_steps_would_be_lost(
    resume_from, resume_from_iteration
):
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-25", iteration=2))
    plan = decide(flags(resume_from, resume_from_iteration), inv)
    assert plan.weights_from == "checkpoint-25"
    assert plan.state_from == "checkpoint-25"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (2, 25)
    # the report says that iter_1's weights would have thrown away 25 steps
    assert "iter_1" in plan.reason
    assert "throw away 25 steps" in plan.reason


def test_row6_explicit_step_and_iteration_obeyed_as_written_with_warning_that_steps_are_discarded():
    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-25", iteration=2))
    plan = decide(flags("25", "iter_1"), inv)
    assert plan.mode == Mode.BOTH
    assert plan.weights_from == "iter_1"
    assert plan.state_from == "checkpoint-25"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (2, 25)
    assert any("25 steps" in w and "discarded" in w for w in plan.warnings), plan.warnings


# --------------------------------------------------------------------------------------------
# the guide's five scenarios


def test_guide_scenario1_defaults_train_from_scratch():
    plan = decide(RecoveryFlags(), inventory())
    assert plan.mode == Mode.FRESH
    assert plan.weights_from == BASE
    assert (plan.iteration, plan.step) == (0, 0)


def test_guide_scenario2_auto_checkpoint_restores_newest_trainer_checkpoint_with_full_state():
    inv = inventory(ckpt("checkpoint-10", 0), ckpt("checkpoint-20", 0), ckpt("checkpoint-15", 0))
    plan = decide(flags("auto", "none"), inv)
    assert plan.mode == Mode.CHECKPOINT
    assert plan.weights_from == plan.state_from == "checkpoint-20"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (0, 20)


def test_guide_scenario3_auto_iteration_uses_newest_complete_iteration_model_with_fresh_state():
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        model("iter_3", 3, status=Status.TORN),  # crash mid-save: not complete
    )
    plan = decide(flags("none", "auto"), inv)
    assert plan.mode == Mode.ITERATION
    assert plan.weights_from == "iter_2"
    assert plan.state_from is None
    assert plan.state_scope == StateScope.NONE
    assert (plan.iteration, plan.step) == (3, 0)


def test_guide_scenario4_log_example_base_model_weights_and_older_checkpoint_optimizer_moments():
    # The guide's log: ./experiments/exp/checkpoint-20 and base_model as iteration 0, neither has
    # a manifest (written by other tools); the checkpoint is older than base_model on disk, so
    # discover() infers it belongs to iteration 0.
    inv = inventory(
        ckpt("checkpoint-20", iteration=0, status=Status.UNVERIFIED, foreign=True, mtime=1000.0),
        model("base_model", 0, status=Status.UNVERIFIED, foreign=True, mtime=2000.0),
        experiment=False,
    )
    plan = decide(flags("auto", "auto"), inv)
    assert plan.mode == Mode.BOTH
    assert plan.weights_from == "base_model"
    assert plan.state_from == "checkpoint-20"
    assert plan.state_scope == StateScope.OPTIMIZER
    assert (plan.iteration, plan.step) == (1, 0)
    assert "Iteration models contain the latest trained weights" in plan.reason


def test_guide_scenario5_explicit_iter_2_and_step_100_of_the_next_iteration_as_written():
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        ckpt("checkpoint-50", iteration=3),
        ckpt("checkpoint-100", iteration=3),
        ckpt("checkpoint-150", iteration=3),
    )
    plan = decide(flags("100", "iter_2"), inv)
    assert plan.mode == Mode.BOTH
    assert plan.weights_from == "iter_2"
    assert plan.state_from == "checkpoint-100"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (3, 100)
    assert any("100 steps" in w and "discarded" in w for w in plan.warnings), plan.warnings


def test_guide_scenario5_with_kept_checkpoint_of_iteration_2_carries_only_optimizer_moments():
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        ckpt("iter_2/checkpoint-100", iteration=2),
    )
    plan = decide(flags("100", "iter_2"), inv)
    assert plan.weights_from == "iter_2"
    assert plan.state_from == "iter_2/checkpoint-100"
    assert plan.state_scope == StateScope.OPTIMIZER
    assert (plan.iteration, plan.step) == (3, 0)


def test_explicit_iter_0_names_the_guides_base_model():
    inv = inventory(model("base_model", 0, status=Status.UNVERIFIED, foreign=True), experiment=False)
    plan = decide(flags("none", "iter_0"), inv)
    assert plan.weights_from == "base_model"
    assert plan.state_from is None
    assert (plan.iteration, plan.step) == (1, 0)


# --------------------------------------------------------------------------------------------
# auto ordering


def test_auto_checkpoint_orders_by_iteration_before_step():
    inv = inventory(
        model("iter_0", 0),
        ckpt("iter_0/checkpoint-500", iteration=0),  # kept copy, higher step, older iteration
        ckpt("checkpoint-10", iteration=1),
    )
    plan = decide(flags("auto", "auto"), inv)
    assert plan.state_from == "checkpoint-10"
    assert (plan.iteration, plan.step) == (1, 10)


def test_auto_orders_unverified_checkpoints_by_modification_time():
    # plain HF Trainer output dir (no manifests): checkpoint-50 was written after checkpoint-100
    inv = inventory(
        ckpt("checkpoint-100", iteration=0, status=Status.UNVERIFIED, foreign=True, mtime=1000.0),
        ckpt("checkpoint-50", iteration=0, status=Status.UNVERIFIED, foreign=True, mtime=2000.0),
        experiment=False,
    )
    plan = decide(flags("auto", "none"), inv)
    assert plan.state_from == "checkpoint-50"


# --------------------------------------------------------------------------------------------
# rule 4: auto only considers candidates consistent with an explicit value on the other flag


def test_auto_checkpoint_ignores_checkpoint_of_a_later_iteration_than_explicit_iteration_model():
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        model("iter_3", 3),
        ckpt("checkpoint-50", iteration=4),
    )
    plan = decide(flags("auto", "iter_1"), inv)
    assert plan.state_from != "checkpoint-50"
    assert plan.mode == Mode.ITERATION
    assert plan.weights_from == "iter_1"
    assert plan.state_from is None
    assert (plan.iteration, plan.step) == (2, 0)


def test_auto_checkpoint_with_explicit_iteration_model_picks_a_consistent_older_checkpoint():
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        model("iter_3", 3),
        ckpt("iter_1/checkpoint-30", iteration=1),
        ckpt("checkpoint-50", iteration=4),
    )
    plan = decide(flags("auto", "iter_1"), inv)
    assert plan.weights_from == "iter_1"
    assert plan.state_from == "iter_1/checkpoint-30"
    assert plan.state_scope == StateScope.OPTIMIZER
    assert (plan.iteration, plan.step) == (2, 0)


def test_auto_iteration_does_not_pair_explicit_checkpoint_with_an_older_inconsistent_model():
    # checkpoint-50 belongs to iteration 4; iter_3 is corrupt, so the newest usable model is iter_2,
    # which a checkpoint of iteration 4 cannot continue from.
    inv = inventory(
        model("iter_0", 0),
        model("iter_1", 1),
        model("iter_2", 2),
        model("iter_3", 3, status=Status.CORRUPT),
        ckpt("checkpoint-50", iteration=4),
    )
    plan = decide(flags("50", "auto"), inv)
    assert plan.weights_from != "iter_2"
    assert plan.weights_from == plan.state_from == "checkpoint-50"
    assert plan.state_scope == StateScope.FULL
    assert (plan.iteration, plan.step) == (4, 50)




def test_newest_usable_skips_rejected_torn_and_stale_marks_alike_and_takes_the_next_older():
    """One function answers "newest and usable": a rejection (verification or loading failed) and a torn
    directory leave the next older artifact; a stale mark (its iteration's model exists) changes nothing."""
    from itertrain.recovery.decide import newest_usable

    inv = inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-8", 1), ckpt("checkpoint-4", 2),
                    ckpt("checkpoint-12", 2, status=Status.TORN), ckpt("checkpoint-8x", 2, step=8))
    auto = flags("auto", "auto")
    pick = newest_usable(auto, inv, {})
    assert (pick.checkpoint.path, pick.model.path) == ("checkpoint-8x", "iter_1")
    pick = newest_usable(auto, inv, {"checkpoint-8x": "verification failed", "iter_1": "load failed"})
    assert (pick.checkpoint.path, pick.model.path) == ("checkpoint-4", "iter_0")
    assert inv.checkpoints[0].status == Status.STALE and inv.checkpoints[0].path == "checkpoint-8"
    gone = {"checkpoint-8x": "x", "checkpoint-4": "x", "iter_1": "x"}
    assert newest_usable(auto, inv, gone).checkpoint.path == "checkpoint-8"  # marked stale, still usable
    assert newest_usable(flags("auto", "none"), inv, {}).checkpoint.path == "checkpoint-8x"
