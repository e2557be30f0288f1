"""Unit tests of the pure retention plan (`plan_retention`): rotation, the optimizer-moment carry,
retirement of older iterations, user-kept checkpoints, and checkpoints whose model is unusable."""

from __future__ import annotations

from itertrain.artifacts.retention import Action, Event, ListedCheckpoint, Op, RetentionPolicy, plan_retention


def c(path: str, iteration: int, kept: bool = False) -> ListedCheckpoint:
    return ListedCheckpoint(path, iteration, int(path.rsplit("-", 1)[1]), kept_by_user=kept)


def ops(actions: list[Action]) -> set[tuple]:
    return {(a.op.value, a.path, a.dest) for a in actions}


def test_rotation_keeps_the_newest_limit_checkpoints_of_the_running_iteration_only():
    listing = [c("checkpoint-4", 1), c("checkpoint-8", 1), c("checkpoint-12", 1), c("iter_0/checkpoint-12", 0)]
    actions = plan_retention(listing, event=Event.CHECKPOINT_COMMITTED, iteration=1,
                             policy=RetentionPolicy(save_total_limit=2), backed={0}, protect={"checkpoint-12"})
    assert ("delete", "checkpoint-4", None) in ops(actions)
    assert not any(a.path in ("checkpoint-8", "checkpoint-12") for a in actions)


def test_rotation_never_removes_the_newest_even_with_a_limit_of_one():
    listing = [c("checkpoint-4", 0), c("checkpoint-8", 0)]
    actions = plan_retention(listing, event=Event.CHECKPOINT_COMMITTED, iteration=0,
                             policy=RetentionPolicy(save_total_limit=1), backed=set())
    assert ops(actions) == {("delete", "checkpoint-4", None)}


def test_rotation_spares_the_best_checkpoint():
    listing = [c("checkpoint-4", 0), c("checkpoint-8", 0), c("checkpoint-12", 0)]
    actions = plan_retention(listing, event=Event.CHECKPOINT_COMMITTED, iteration=0,
                             policy=RetentionPolicy(save_total_limit=1), backed=set(), protect={"checkpoint-4"})
    assert ops(actions) == {("delete", "checkpoint-8", None)}


def test_iteration_commit_moves_the_newest_checkpoint_in_as_the_carry_and_deletes_the_rest():
    listing = [c("checkpoint-4", 2), c("checkpoint-8", 2), c("checkpoint-12", 2)]
    actions = plan_retention(listing, event=Event.ITERATION_COMMITTED, iteration=2, policy=RetentionPolicy(),
                             backed={0, 1, 2})
    assert ops(actions) == {("delete", "checkpoint-4", None), ("delete", "checkpoint-8", None),
                            ("move", "checkpoint-12", "iter_2/checkpoint-12")}


def test_last_iteration_keeps_no_carry_and_drops_older_carries():
    listing = [c("checkpoint-12", 2), c("iter_1/checkpoint-12", 1)]
    actions = plan_retention(listing, event=Event.ITERATION_COMMITTED, iteration=2, policy=RetentionPolicy(),
                             backed={0, 1, 2}, last=True)
    assert ops(actions) == {("delete", "checkpoint-12", None), ("delete", "iter_1/checkpoint-12", None)}


def test_iteration_init_base_carries_nothing():
    listing = [c("checkpoint-8", 0), c("checkpoint-12", 0)]
    actions = plan_retention(listing, event=Event.ITERATION_COMMITTED, iteration=0,
                             policy=RetentionPolicy(carry_optimizer=False), backed={0})
    assert {a.op for a in actions} == {Op.DELETE}


def test_keep_iteration_checkpoints_moves_every_checkpoint_into_the_model():
    listing = [c("checkpoint-4", 0), c("checkpoint-8", 0)]
    actions = plan_retention(listing, event=Event.ITERATION_COMMITTED, iteration=0,
                             policy=RetentionPolicy(keep_iteration_checkpoints=True), backed={0})
    assert ops(actions) == {("move", "checkpoint-4", "iter_0/checkpoint-4"), ("move", "checkpoint-8", "iter_0/checkpoint-8")}


def test_first_checkpoint_of_the_next_iteration_retires_the_carry():
    listing = [c("iter_0/checkpoint-12", 0), c("checkpoint-4", 1)]
    actions = plan_retention(listing, event=Event.CHECKPOINT_COMMITTED, iteration=1, policy=RetentionPolicy(),
                             backed={0}, protect={"checkpoint-4"})
    assert ops(actions) == {("delete", "iter_0/checkpoint-12", None)}


def test_checkpoints_the_user_kept_survive_a_resume_without_keep_iteration_checkpoints():
    listing = [c("iter_0/checkpoint-4", 0, kept=True), c("iter_0/checkpoint-8", 0, kept=True), c("checkpoint-4", 1)]
    actions = plan_retention(listing, event=Event.CHECKPOINT_COMMITTED, iteration=1, policy=RetentionPolicy(),
                             backed={0}, protect={"checkpoint-4"})
    assert actions == []


def test_checkpoints_of_an_iteration_whose_model_is_unusable_are_never_retired():
    listing = [c("checkpoint-8", 1), c("checkpoint-12", 1)]
    plan_made = plan_retention(listing, event=Event.PLAN_MADE, iteration=2, policy=RetentionPolicy(), backed={0})
    assert plan_made == []
    committed = plan_retention(listing + [c("checkpoint-4", 2)], event=Event.CHECKPOINT_COMMITTED, iteration=2,
                               policy=RetentionPolicy(), backed={0}, protect={"checkpoint-4"})
    assert committed == []


def test_interrupted_retirement_retires_stale_checkpoints_but_not_the_protected_one():
    listing = [c("checkpoint-4", 0), c("checkpoint-8", 0), c("checkpoint-12", 0)]
    actions = plan_retention(listing, event=Event.PLAN_MADE, iteration=1, policy=RetentionPolicy(), backed={0},
                             protect={"checkpoint-12"})
    assert ops(actions) == {("delete", "checkpoint-4", None), ("delete", "checkpoint-8", None)}


def test_a_move_never_overwrites_an_existing_kept_checkpoint():
    listing = [c("checkpoint-12", 0), c("iter_0/checkpoint-12", 0, kept=True)]
    actions = plan_retention(listing, event=Event.ITERATION_COMMITTED, iteration=0,
                             policy=RetentionPolicy(keep_iteration_checkpoints=True), backed={0})
    assert ops(actions) == {("delete", "checkpoint-12", None)}


def test_whether_checkpoints_inside_a_model_were_kept_by_the_user_follows_one_rule(tmp_path):
    """The manifest's record wins; an older manifest without it: kept only when more than one is inside;
    an unreadable manifest: kept (retention never deletes what may be the user's)."""
    from itertrain.artifacts.manager import KEPT_CHECKPOINTS, kept_by_user
    from itertrain.artifacts.manifest import commit_directory
    from itertrain.layout import MANIFEST_NAME

    def model(name: str, extra: dict):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        commit_directory(d, kind="iteration_model", iteration=0, step=0, extra=extra)
        return d

    said_no, said_yes, older = model("no", {KEPT_CHECKPOINTS: False}), model("yes", {KEPT_CHECKPOINTS: True}), model("old", {})
    assert (kept_by_user(said_no, 3), kept_by_user(said_yes, 1)) == (False, True)
    assert (kept_by_user(older, 1), kept_by_user(older, 2)) == (False, True)
    (older / MANIFEST_NAME).write_text("{not json")
    assert kept_by_user(older, 1) is True
