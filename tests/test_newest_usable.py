"""`newest_usable`, the one answer to "which artifact is newest and usable", as a table.

Each row: an inventory as discover() returns it, the flags, what earlier checks rejected (deep
verification, a load on some rank: resolve's fallback), and the artifacts the launch continues from
with the reason every skipped one was skipped. `decide` asks `newest_usable` again when its plan
cannot serve the pick (LoRA, superseded): those rows go through `decide`. Pure: no torch, no disk.
"""

from __future__ import annotations

import pytest

from itertrain.recovery.decide import decide, newest_usable
from itertrain.recovery.discover import Status
from plan_helpers import ckpt, flags, inventory, model, rejected_paths

AUTO = flags("auto", "auto")
UNREADABLE = "manifest unreadable: Expecting value: line 1 column 1 (char 0)"

ROWS = {
    "torn newest checkpoint: the previous one": (
        inventory(model("iter_0", 0), ckpt("checkpoint-8", 1), ckpt("checkpoint-12", 1, status=Status.TORN)),
        AUTO, {}, ("checkpoint-8", "iter_0"), {"checkpoint-12": "torn: no manifest"},
    ),
    "stale newest checkpoint: still usable, its moments carry over": (
        inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-4", 0), ckpt("checkpoint-8", 1)),
        AUTO, {}, ("checkpoint-8", "iter_1"), {},
    ),
    "unreadable newest iteration model: the older one and its iteration's checkpoint": (
        inventory(model("iter_0", 0), model("iter_1", 1, status=Status.CORRUPT, problem=UNREADABLE),
                  ckpt("checkpoint-8", 1)),
        AUTO, {}, ("checkpoint-8", "iter_0"), {"iter_1": "corrupt: manifest unreadable"},
    ),
    "newest failed to load on a rank: the next older": (
        inventory(model("iter_0", 0), ckpt("checkpoint-4", 1), ckpt("checkpoint-8", 1)),
        AUTO, {"checkpoint-8": "loading weights failed on rank 1: truncated"}, ("checkpoint-4", "iter_0"),
        {"checkpoint-8": "loading weights failed on rank 1"},
    ),
    "LoRA mismatch: a merged adapter without the model it was trained on": (
        inventory(model("iter_0", 0, status=Status.CORRUPT), ckpt("checkpoint-3", 0), ckpt("checkpoint-6", 1)),
        flags("auto", "auto", lora="merged"), {}, ("checkpoint-3", None),
        {"iter_0": "corrupt: ", "checkpoint-6": "a LoRA adapter trained on iter_0"},
    ),
    "superseded: a checkpoint kept inside the model this run replaces": (
        inventory(model("iter_0", 0), model("iter_1", 1), ckpt("checkpoint-4", 1), ckpt("iter_1/checkpoint-8", 1)),
        flags("auto", "iter_0"), {}, ("checkpoint-4", "iter_0"),
        {"iter_1/checkpoint-8": "kept inside iter_1, which this run replaces"},
    ),
}


@pytest.mark.parametrize("row", ROWS, ids=list(ROWS))
def test_newest_usable_picks_the_newest_usable_artifacts_and_says_why_each_newer_one_was_skipped(row):
    inv, f, rejected, (want_ckpt, want_model), want_skips = ROWS[row]
    plan = decide(f, inv, rejected)
    assert plan.checkpoint is not None and plan.checkpoint.path == want_ckpt
    assert (plan.iteration_model.path if plan.iteration_model else None) == want_model
    skips = rejected_paths(plan)
    assert set(skips) == set(want_skips)
    for path, why in want_skips.items():
        assert skips[path].startswith(why), (path, skips[path])


@pytest.mark.parametrize("row", [r for r in ROWS if not r.startswith(("LoRA", "superseded"))])
def test_newest_usable_alone_gives_the_same_pick_and_skips_as_the_plan(row):
    """Without a plan that cannot serve its pick, `decide` adds nothing: the pick and the skip reasons
    are `newest_usable`'s own."""
    inv, f, rejected, (want_ckpt, want_model), want_skips = ROWS[row]
    pick = newest_usable(f, inv, rejected)
    assert (pick.checkpoint.path, pick.model.path if pick.model else None) == (want_ckpt, want_model)
    assert {r.path for r in pick.rejected} == set(want_skips)
