"""Directories written by other tools: a plain HF Trainer output dir and the guide's `base_model/`
(a sharded `save_pretrained` folder) are adopted after a structural check, reported as unverified,
and never deleted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, base_env, itertrain, manifest

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

PLAIN_HF = """
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
model_dir, out, data = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list([tok(r["prompt"] + r["completion"]) for r in rows])
from transformers import DataCollatorForLanguageModeling
args = TrainingArguments(output_dir=out, max_steps=8, save_steps=4, per_device_train_batch_size=4,
                         report_to=[], use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
model.save_pretrained(out + "/base_model", max_shard_size="1MB")   # the guide's iteration-0 model, sharded
tok.save_pretrained(out + "/base_model")
"""


@pytest.fixture
def guide_layout(tmp_path, tiny_model, train_file) -> Path:
    out = tmp_path / "experiments" / "exp"
    script = tmp_path / "plain_hf.py"
    script.write_text(PLAIN_HF)
    subprocess.run([PY, str(script), str(tiny_model), str(out), str(train_file)], check=True, env=base_env(),
                   capture_output=True)
    assert (out / "base_model" / "model.safetensors.index.json").exists()
    assert not list(out.rglob("itertrain.manifest.json"))
    return out


def test_guide_layout_is_adopted_and_resumed_like_the_guides_log(guide_layout, tiny_model, train_file):
    out = guide_layout
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    kinds = {a["path"]: a["status"] for a in status["inventory"]["iteration_models"] + status["inventory"]["checkpoints"]}
    assert kinds == {"base_model": "unverified", "checkpoint-4": "unverified", "checkpoint-8": "unverified"}
    # base_model/ was written after the checkpoints: the guide's log example.
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                  "--num_iterations", "2", "--max_steps", "8", "--save_steps", "4", "--per_device_train_batch_size", "4",
                  "--disable_tqdm", "true", "--report_to", "none",
                  "--resume_from", "auto", "--resume_from_iteration", "auto")
    assert r.returncode == 0, r.output
    assert f"📁 Found trainer checkpoint: {out}/checkpoint-8" in r.stdout
    assert "(written by another tool)" in r.stdout
    assert f"🎯 Found COMPLETE iteration 0 model: {out}/base_model" in r.stdout
    assert "🔀 BOTH checkpoints found - using ITERATION model for weights" in r.stdout
    assert f"📁 Training state from: {out}/checkpoint-8" in r.stdout
    assert "Continuing at: iteration 1, step 0" in r.stdout
    assert manifest(out / "iter_1")["lineage"]["weights_from"] == "base_model"
    # Adopted directories are never deleted, even where iteration 1 saved checkpoints with their names.
    assert (out / "base_model" / "model.safetensors.index.json").exists()
    moved = sorted(p.relative_to(out).as_posix() for p in (out / "superseded").rglob("trainer_state.json"))
    assert [m.split("/", 2)[2] for m in moved] == ["checkpoint-4/trainer_state.json", "checkpoint-8/trainer_state.json"]
    assert json.loads((out / "itertrain.json").read_text())["adopted"] == ["base_model", "checkpoint-4", "checkpoint-8"]


def test_newer_plain_hf_checkpoint_is_restored_in_full(guide_layout, tiny_model, train_file):
    out = guide_layout
    now = os.path.getmtime(out / "base_model") + 100
    os.utime(out / "checkpoint-8", (now, now))  # written after base_model: it holds the latest weights
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    plan = status["plan"]
    assert (plan["mode"], plan["state_from"], plan["iteration"], plan["step"]) == ("checkpoint", "checkpoint-8", 1, 8)


def test_foreign_checkpoint_that_fails_the_structural_check_is_rejected_with_the_reason(guide_layout):
    out = guide_layout
    (out / "checkpoint-8" / "scheduler.pt").write_bytes(b"not a torch archive")
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    rejected = {r["path"]: r["reason"] for r in status["plan"]["rejected"]}
    assert "scheduler.pt is not a readable torch archive" in rejected["checkpoint-8"]
    assert status["plan"]["state_from"] == "checkpoint-4"
