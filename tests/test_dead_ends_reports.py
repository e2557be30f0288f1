"""Dead ends (states a user could not get out of): what the report says is what happens, kept checkpoints stay kept,
changed hyperparameters are reported and recorded as they apply, and rank 0 speaks once. Real
processes, real kills and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, base_env, free_port, itertrain, manifest, PY, torchrun

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("recovery-*.json"))]


# ---- item 4 --------------------------------------------------------------------------------------
def test_iteration_init_base_report_says_the_base_model_gives_the_weights_and_the_state_starts_fresh(
        tmp_path, sft_args, tiny_model):
    out = tmp_path / "exp"
    args = sft_args(out, "--iteration_init", "base")
    # iter_0 committed, killed before its checkpoints were cleaned up: a checkpoint of iteration 0 is
    # found, but under --iteration_init base nothing comes from it.
    r = itertrain("train", *args, fault="iteration.after_manifest=kill#1")
    assert r.returncode == -9 and (out / "checkpoint-12").exists(), r.output
    r = itertrain("train", *args, *AUTO)
    assert r.returncode == 0, r.output
    box = r.stdout.split("RECOVERY STRATEGY:")[1]
    assert "🆕 BASE model for weights (--iteration_init base) - training state starts fresh" in box
    assert "BOTH" not in box and "using ITERATION model for weights" not in box
    assert f"🎯 Model weights from: {tiny_model} (base model)" in box
    assert "📁 Training state from: none" in box and "none (fresh training state)" in box
    assert "Continuing at: iteration 1, step 0" in box
    assert "⏭️  Not used by this plan" in r.stdout  # the checkpoint found is named, and not used
    plan = reports(out)[-1]["plan"]
    assert (plan["mode"], plan["weights_from"], plan["state_from"]) == ("iteration", "base", None)
    lineage = manifest(out / "iter_1")["lineage"]
    assert (lineage["weights_from"], lineage["state_scope"], lineage["state_from"]) == ("base", "none", None)


# ---- item 5 --------------------------------------------------------------------------------------
def test_turning_keep_iteration_checkpoints_off_on_a_resume_keeps_the_checkpoints_kept_earlier(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out, "--keep_iteration_checkpoints", "true"), fault="checkpoint.save=kill#5")
    assert r.returncode == -9, r.output
    kept = ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in (out / "iter_0").glob("checkpoint-*")) == kept
    before = {name: (out / "iter_0" / name / "model.safetensors").read_bytes() for name in kept}

    r = itertrain("train", *sft_args(out), *AUTO)  # the flag is off now
    assert r.returncode == 0, r.output
    assert sorted(p.name for p in (out / "iter_0").glob("checkpoint-*")) == kept
    assert {name: (out / "iter_0" / name / "model.safetensors").read_bytes() for name in kept} == before
    assert not list((out / "iter_1").glob("checkpoint-*")) and not list(out.glob("checkpoint-*"))
    report = json.loads(itertrain("verify", str(out), "--json").stdout)
    ok = {a["path"]: a["ok"] for a in report["artifacts"]}
    assert {f"iter_0/{name}": True for name in kept}.items() <= ok.items(), ok
    assert report["ok"] is True


# ---- item 8 --------------------------------------------------------------------------------------
def test_changed_learning_rate_on_a_mid_iteration_resume_says_what_applies_when_and_records_it(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out), fault="checkpoint.save=kill#2")  # iteration 0, checkpoint-4 committed
    assert r.returncode == -9, r.output
    r = itertrain("train", *sft_args(out, "--learning_rate", "5e-4", "--keep_iteration_checkpoints", "true"), *AUTO)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 0, step 4" in r.stdout
    assert ("learning_rate 0.001 -> 0.0005: the restored optimizer and scheduler keep 0.001 until iteration 0 "
            "ends; 0.0005 applies from iteration 1") in r.stdout
    assert "argument changed: learning_rate" not in r.stdout  # said once, precisely
    used = json.loads((out / "itertrain.json").read_text())["iterations"]
    assert used["0"]["hyperparameters"]["learning_rate"] == 0.001
    assert used["1"]["hyperparameters"]["learning_rate"] == 0.0005

    def logged(k: int) -> list[float]:
        state = json.loads((out / f"iter_{k}" / "checkpoint-12" / "trainer_state.json").read_text())
        return [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]

    # linear decay over 12 steps, logged at steps 4, 8, 12: the rate at step s is lr * (12 - s + 1) / 12
    assert logged(0) == pytest.approx([1e-3 * 9 / 12, 1e-3 * 5 / 12, 1e-3 * 1 / 12])
    assert logged(1) == pytest.approx([5e-4 * 9 / 12, 5e-4 * 5 / 12, 5e-4 * 1 / 12])
    assert manifest(out / "iter_1")["lineage"]["hyperparameters"]["learning_rate"] == 0.0005


# ---- item 15 -------------------------------------------------------------------------------------
def test_interrupted_and_created_config_messages_are_printed_once_under_two_ranks(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = torchrun(*sft_args(out, iterations=1))
    assert r.returncode == 0, r.output
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / "iter_0" / name).unlink()
    # Relaunch for one more iteration; it repairs iter_0, then both ranks wait at the start of training
    # and the torchrun process group gets SIGINT, as Ctrl-C in a terminal sends it.
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "train_iterative.py"), *sft_args(out, iterations=2), *AUTO]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=base_env({"ITERTRAIN_FAULT": "stage.train=sleep:120"}), start_new_session=True)
    lines = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "stage: train" in line:
            time.sleep(3)  # both ranks are in the sleep by now
            os.killpg(proc.pid, signal.SIGINT)
            break
    out_rest, err = proc.communicate(timeout=120)
    stdout = "".join(lines) + out_rest
    assert proc.returncode != 0, stdout + err
    assert err.count("itertrain: interrupted") == 1, err
    assert "resume_from auto" in err
    created = [line for line in stdout.splitlines() if "created missing" in line]
    assert sum("created missing config.json in iter_0" in line for line in created) == 1, stdout
    assert sum("(weight shapes checked)" in line for line in created) == 1, created
    tokenizer_notes = [line for line in created if "tokenizer" in line]
    assert tokenizer_notes and not any("weight shapes checked" in line for line in tokenizer_notes), tokenizer_notes
    assert "Traceback" not in "".join(line for line in err.splitlines(True) if "itertrain" in line)
    assert itertrain("verify", str(out)).returncode == 0
