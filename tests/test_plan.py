"""Unit tests of the recovery decision (SPEC §3, recovery guide scenarios 1-5).

`decide(flags, inventory, rejected)` is pure: every inventory here is built directly from the
discover() dataclasses, with relative paths as discover() produces them (top level
`checkpoint-S`, kept copies `iter_K/checkpoint-S`, iteration models `iter_K`, the guide's
`base_model` as a foreign iteration-0 model). No torch, no disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from itertrain.errors import RecoveryRefused, UsageError
from itertrain.recovery.discover import Inventory, IterationModel, Status, TrainerCheckpoint
from itertrain.recovery.plan import (
    BASE,
    Mode,
    RecoveryFlags,
    StateScope,
    decide,
    parse_resume_from,
    parse_resume_from_iteration,
)

OUT = "./experiments/exp"
TORN = "no manifest (the save never completed)"
CORRUPT = "optimizer.pt is 10 bytes, the manifest says 2048"


# --------------------------------------------------------------------------------------------
# helpers


def ckpt(path, iteration, step=None, status=Status.COMMITTED, mtime=None, foreign=False, problem=None):
    """A trainer checkpoint; `step` defaults to the number in the directory name."""
    if step is None:
        step = int(path.rsplit("checkpoint-", 1)[1])
    if problem is None and status == Status.TORN:
        problem = TORN
    if problem is None and status == Status.CORRUPT:
        problem = CORRUPT
    if mtime is None:
        mtime = 1_000_000.0 + iteration * 10_000 + step
    return TrainerCheckpoint(path, step, iteration, status, mtime, problem, None, foreign)


def model(path, iteration, status=Status.COMMITTED, mtime=None, foreign=False, problem=None):
    if problem is None and status == Status.TORN:
        problem = TORN
    if problem is None and status == Status.CORRUPT:
        problem = "model.safetensors is 12 bytes, the manifest says 4096"
    if mtime is None:
        mtime = 1_000_000.0 + iteration * 10_000 + 5_000
    return IterationModel(path, iteration, status, mtime, problem, (), foreign)


def inventory(*artifacts, experiment=True):
    """An Inventory as discover() returns it: committed checkpoints of an iteration whose model is
    usable are marked STALE, and both lists are sorted the same way."""
    models = sorted((a for a in artifacts if isinstance(a, IterationModel)), key=lambda m: (m.iteration, m.path))
    newest = max((m.iteration for m in models if m.status.usable), default=None)
    ckpts = []
    for c in artifacts:
        if not isinstance(c, TrainerCheckpoint):
            continue
        if c.status == Status.COMMITTED and newest is not None and c.iteration <= newest:
            c = TrainerCheckpoint(c.path, c.step, c.iteration, Status.STALE, c.mtime, c.problem, c.world_size, c.foreign)
        ckpts.append(c)
    ckpts.sort(key=lambda c: (c.iteration, c.step, c.path))
    return Inventory(OUT, experiment, tuple(ckpts), tuple(models))


def flags(resume_from="none", resume_from_iteration="none", **kw):
    kw.setdefault("num_iterations", 10)
    return RecoveryFlags(resume_from, resume_from_iteration, **kw)


def rejected_paths(plan):
    return {r.path: r.reason for r in plan.rejected}


# --------------------------------------------------------------------------------------------
# SPEC §3 decision table, one test per row


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
    here = Path(__file__).resolve()
    code = (
        "import sys, importlib.util\n"
        "import itertrain.recovery.plan\n"
        "assert 'torch' not in sys.modules, 'itertrain.recovery.plan imported torch'\n"
        f"spec = importlib.util.spec_from_file_location('test_plan_probe', {str(here)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules, 'tests/test_plan.py imported torch'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=here.parent.parent, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
