"""Dead ends (states a user could not get out of): directories written by other tools. Expert iteration takes the model it
samples from out of the plan (the guide's `base_model/`), and a plain HF checkpoint taken at its own
`max_steps` continues to the current `--max_steps`. Real plain-HF output, real itertrain runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, PY, base_env, itertrain, manifest
from test_foreign_artifacts import PLAIN_HF

pytestmark = pytest.mark.slow  # real processes: training, plain HF Trainer

AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


@pytest.fixture(scope="module")
def plain_hf_output(tmp_path_factory, tiny_model, train_file) -> Path:
    """What plain HF Trainer leaves (checkpoint-4, checkpoint-8 at its max_steps 8) plus the guide's
    `base_model/`, saved after the checkpoints."""
    work = tmp_path_factory.mktemp("plain-hf")
    script = work / "plain_hf.py"
    script.write_text(PLAIN_HF)
    out = work / "exp"
    subprocess.run([PY, str(script), str(tiny_model), str(out), str(train_file)], check=True, env=base_env(),
                   capture_output=True)
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["max_steps"] == 8
    return out


# ---- item 3 --------------------------------------------------------------------------------------
def test_expert_iteration_on_the_guides_base_model_layout_samples_from_the_plans_model(
        plain_hf_output, tmp_path, tiny_model):
    from itertrain.artifacts.manifest import fingerprint

    out = tmp_path / "exp"
    shutil.copytree(plain_hf_output, out, symlinks=True)
    base_id = fingerprint(out / "base_model")
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "expert_iteration",
                  "--task", "arithmetic", "--num_iterations", "2", "--samples_per_prompt", "1", "--max_new_tokens", "4",
                  "--reward_threshold", "0", *FAST_FLAGS, *AUTO, timeout=600)
    assert r.returncode == 0, r.output
    assert "Traceback" not in r.output and "OSError" not in r.output
    assert f"🎯 Model weights from: {out}/base_model" in r.stdout and "Continuing at: iteration 1, step 0" in r.stdout
    data = manifest(out / "data" / "iter_1")
    assert data["lineage"]["weights_from"] == "base_model"
    assert data["lineage"]["weights_id"] == base_id == data["extra"]["weights_id"]
    lineage = manifest(out / "iter_1")["lineage"]
    assert (lineage["previous_model"], lineage["previous_id"]) == ("base_model", base_id)
    assert fingerprint(out / "base_model") == base_id  # read, never written


# ---- item 7 --------------------------------------------------------------------------------------
def test_adopted_checkpoint_taken_at_its_own_max_steps_continues_to_the_current_max_steps(
        plain_hf_output, tmp_path, tiny_model, train_file):
    out = tmp_path / "exp"
    out.mkdir()
    for name in ("checkpoint-4", "checkpoint-8"):  # a plain HF Trainer output dir, no base_model/
        shutil.copytree(plain_hf_output / name, out / name)
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                  "--num_iterations", "1", *FAST_FLAGS, *AUTO)  # --max_steps 12 --save_steps 4 --logging_steps 4
    assert r.returncode == 0, r.output
    assert f"Training state from: {out}/checkpoint-8" in r.stdout and "Continuing at: iteration 0, step 8" in r.stdout
    assert "max_steps 8 -> 12: applies now (iteration 0 continues at step 8 and ends at step 12)" in r.stdout
    assert ("logging_steps 500 -> 4: HF Trainer restores 500 from checkpoint-8/trainer_state.json until "
            "iteration 0 ends; 4 applies from iteration 1") in r.stdout
    m = manifest(out / "iter_0")
    assert m["step"] == 12 and m["extra"]["metrics"]["steps"] == 12
    # the adopted directories are the user's: read, never deleted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
