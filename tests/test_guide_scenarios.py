"""The guide's five scenarios, end to end under `torchrun --nproc_per_node=2`, chained on one experiment.

Each launch is interrupted by a real SIGKILL of the whole process group at a named point, leaving
exactly the state the next scenario needs.
"""

from __future__ import annotations

import pytest

import json

from conftest import itertrain, manifest, torchrun


pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

def _report(r) -> str:
    assert "CHECKPOINT RECOVERY SYSTEM" in r.stdout, r.output
    return r.stdout


def test_the_guides_five_scenarios_under_torchrun(tmp_path, sft_args):
    out = tmp_path / "exp"

    # Scenario 1: train from scratch; killed while saving iteration 0's second checkpoint.
    r = torchrun(*sft_args(out), "--resume_from", "none", "--resume_from_iteration", "none",
                 fault="checkpoint.save=kill#2")
    log = _report(r)
    assert "🆕 NO checkpoints selected - training from scratch" in log
    assert "Continuing at: iteration 0, step 0" in log
    assert manifest(out / "checkpoint-4")["world_size"] == 2

    # Scenario 2: trainer checkpoint only -> full restore, continue iteration 0 at step 4.
    # Killed right after iter_0 committed, before its checkpoints were cleaned up (stale ones remain).
    r = torchrun(*sft_args(out), "--resume_from", "auto", "--resume_from_iteration", "none",
                 fault="iteration.after_manifest=kill")
    log = _report(r)
    assert "📁 TRAINER checkpoint only - full restore" in log
    assert f"Found trainer checkpoint: {out}/checkpoint-4" in log
    assert "Continuing at: iteration 0, step 4" in log
    assert (out / "iter_0" / "itertrain.manifest.json").exists() and (out / "checkpoint-12").exists()

    # Scenario 4 (the guide's log example): both found, the iteration model is newer -> weights from
    # iter_0, optimizer moments from the stale checkpoint-12, iteration 1 from step 0.
    r = torchrun(*sft_args(out), "--resume_from", "auto", "--resume_from_iteration", "auto",
                 fault="checkpoint.save=kill#3")
    log = _report(r)
    assert f"📁 Found trainer checkpoint: {out}/checkpoint-12" in log
    assert f"🎯 Found COMPLETE iteration 0 model: {out}/iter_0" in log
    assert "🔀 BOTH checkpoints found - using ITERATION model for weights" in log
    assert "📋 Reason: Iteration models contain the latest trained weights" in log
    assert f"🎯 Model weights from: {out}/iter_0" in log
    assert f"📁 Training state from: {out}/checkpoint-12" in log
    assert "optimizer moments only" in log
    assert "Continuing at: iteration 1, step 0" in log
    assert manifest(out / "checkpoint-8")["iteration"] == 1

    # Scenario 5: explicit iteration model + explicit checkpoint of the next iteration: obeyed as written.
    r = torchrun(*sft_args(out), "--resume_from", "4", "--resume_from_iteration", "iter_0",
                 fault="stage.commit=kill")
    log = _report(r)
    assert "🔀 BOTH checkpoints found - using ITERATION model for weights" in log
    assert f"🎯 Model weights from: {out}/iter_0" in log
    assert f"📁 Training state from: {out}/checkpoint-4" in log
    assert "Continuing at: iteration 1, step 4" in log
    assert "4 steps of weight updates" in log and "discarded" in log
    assert "superseded" in log  # checkpoint-8 of the same iteration is moved aside, not overwritten
    assert manifest(out / "checkpoint-12")["lineage"]["weights_from"] == "iter_0"

    # Scenario 3: iteration model only -> weights from the newest complete one, fresh training state.
    r = torchrun(*sft_args(out, iterations=3), "--resume_from", "none", "--resume_from_iteration", "auto")
    log = _report(r)
    assert "🎯 ITERATION model only - weights only, training state starts fresh" in log
    assert f"🎯 Model weights from: {out}/iter_0" in log  # iter_1 was never committed (killed at commit)
    assert "Continuing at: iteration 1, step 0" in log
    assert "ignoring" in log  # checkpoints of iteration 1 are ignored because --resume_from none
    assert r.returncode == 0, r.output
    assert [m["iteration"] for m in map(manifest, sorted(out.glob("iter_*")))] == [0, 1, 2]
    assert itertrain("verify", str(out)).returncode == 0
    reports = sorted((out / "runs").glob("recovery-*.json"))
    assert len(reports) == 5
    assert json.loads(reports[-1].read_text())["plan"]["mode"] == "iteration"


def test_scenario5_takes_the_weights_from_the_iteration_model_and_auto_from_the_checkpoint(tmp_path, sft_args):
    """At a checkpoint taken at the iteration's last step nothing is left to train, so the committed
    iteration model holds exactly the weights the plan loaded: iter_0's as written (scenario 5),
    the checkpoint's with auto (rule 2)."""
    import shutil

    import torch

    from conftest import weights

    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out), fault="stage.commit=kill#2")  # iteration 1 trained, not committed
    assert r.returncode == -9 and manifest(out / "checkpoint-12")["iteration"] == 1, r.output
    other = tmp_path / "copy"
    shutil.copytree(out, other, symlinks=True)

    r = itertrain("train", *sft_args(out), "--resume_from", "12", "--resume_from_iteration", "iter_0")
    assert r.returncode == 0, r.output
    assert "12 steps of weight updates" in r.stdout and "discarded" in r.stdout
    w_iter0, w_iter1 = weights(out / "iter_0"), weights(out / "iter_1")
    assert w_iter1.keys() == w_iter0.keys() and all(torch.equal(w_iter1[k], w_iter0[k]) for k in w_iter0)

    auto = [str(other) if a == str(out) else a for a in sft_args(out)]
    ckpt = weights(other / "checkpoint-12")
    r = itertrain("train", *auto, "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    w_auto = weights(other / "iter_1")
    assert all(torch.equal(w_auto[k], ckpt[k]) for k in ckpt)
    assert not all(torch.equal(w_auto[k], w_iter0[k]) for k in w_iter0)
