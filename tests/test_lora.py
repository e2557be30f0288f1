"""LoRA iteration models end to end: real PEFT, real torchrun with 2 ranks, real kills. Both
`--iteration_model merged` and `adapter`: byte-identical iteration models after a kill, loading iter_K
with plain Hugging Face / PEFT, the recorded reference to the base model, and adapter_config.json recreated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, PY, REPO, base_env, itertrain, manifest, torchrun, tree_hash

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

ITERATION_FILES = {"merged": ("model.safetensors", "config.json"), "adapter": ("adapter_model.safetensors",
                                                                                "adapter_config.json")}
AUTO = ("--resume_from", "auto", "--resume_from_iteration", "auto")


def lora_args(base: Path, train_file: Path, out: Path, mode: str, *extra: str, iterations: int = 2) -> list[str]:
    return ["--model_name", str(base), "--output_dir", str(out), "--train_file", str(train_file), "--num_iterations",
            str(iterations), *FAST_FLAGS, "--use_peft", "--iteration_model", mode, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, train_file) -> dict[str, Path]:
    """One uninterrupted 2-rank run of 2 iterations per mode."""
    out = {}
    for mode in ITERATION_FILES:
        d = tmp_path_factory.mktemp(f"lora-{mode}") / "exp"
        r = torchrun(*lora_args(tiny_model, train_file, d, mode), timeout=900)
        assert r.returncode == 0, r.output
        out[mode] = d
    return out


@pytest.mark.parametrize("mode", sorted(ITERATION_FILES))
def test_two_rank_lora_run_killed_in_iteration_1_relaunches_to_byte_identical_iteration_models(
        mode, uninterrupted, tiny_model, train_file, tmp_path):
    out = tmp_path / "exp"
    args = lora_args(tiny_model, train_file, out, mode)
    # saves: iteration 0 at steps 4, 8, 12; iteration 1 at 4, then killed inside the save of its checkpoint-8
    r = torchrun(*args, fault="checkpoint.save=kill#5", timeout=900)
    assert r.returncode != 0 and (out / "iter_0" / "itertrain.manifest.json").exists()
    assert manifest(out / "checkpoint-4")["iteration"] == 1
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"adapter_model.safetensors", "optimizer.pt",
                                                                  "rng_state_0.pth", "rng_state_1.pth"}
    assert not (out / "checkpoint-4" / "model.safetensors").exists()  # the adapter only, not the model
    r = torchrun(*args, *AUTO, timeout=900)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 4" in r.stdout
    assert "Contains: LoRA adapter + optimizer + scheduler states" in r.stdout
    assert f"LoRA adapter (--iteration_model {mode}) from {out}/checkpoint-4" in r.stdout
    ref = uninterrupted[mode]
    for k in (0, 1):
        for name in ITERATION_FILES[mode]:
            assert (out / f"iter_{k}" / name).read_bytes() == (ref / f"iter_{k}" / name).read_bytes(), (k, name)
    # optimizer moments crossed the boundary only where the adapter continues
    lineage = manifest(ref / "iter_1")["lineage"]
    assert lineage["state_scope"] == ("optimizer_moments" if mode == "adapter" else "none")
    assert lineage["adapter_of"]["path"] == (str(tiny_model.resolve()) if mode == "adapter" else "iter_0")


def test_merged_iteration_model_loads_with_automodel_and_adapter_one_with_autopeftmodel(uninterrupted):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[1, 10, 11, 12, 13]])
    merged = AutoModelForCausalLM.from_pretrained(uninterrupted["merged"] / "iter_1", local_files_only=True).eval()
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in k for k in merged.state_dict())
    adapter = AutoPeftModelForCausalLM.from_pretrained(uninterrupted["adapter"] / "iter_1", local_files_only=True).eval()
    assert isinstance(adapter, PeftModel)
    config = json.loads((uninterrupted["adapter"] / "iter_1" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=x).logits).all()
        trained = adapter(input_ids=x).logits
        with adapter.disable_adapter():
            assert not torch.equal(adapter(input_ids=x).logits, trained)  # the adapter changes the model


def test_missing_adapter_config_is_recreated_from_the_recorded_settings_byte_identical(uninterrupted, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(uninterrupted["adapter"], out)
    config = out / "iter_1" / "adapter_config.json"
    original = config.read_bytes()
    config.unlink()
    args = json.loads((out / "itertrain.json").read_text())["arguments"]
    r = itertrain("train", "--model_name", args["model_name"], "--output_dir", str(out), "--train_file",
                  args["train_file"], "--num_iterations", "3", *FAST_FLAGS, "--max_steps", "4", "--use_peft",
                  "--iteration_model", "adapter", *AUTO)
    assert r.returncode == 0, r.output
    assert ("created missing adapter_config.json in iter_1 from the recorded LoRA settings (tensor shapes checked)"
            in r.stdout)
    assert config.read_bytes() == original
    assert manifest(out / "iter_1")["extra"]["repaired"] == ["adapter_config.json"]


def test_recreating_adapter_config_refuses_settings_that_do_not_fit_the_tensors(uninterrupted, tiny_model, tmp_path):
    from itertrain.lora import settings_of
    from itertrain.lora.files import rebuild_adapter_config
    from itertrain.args import LoraArguments

    d = tmp_path / "iter_0"
    shutil.copytree(uninterrupted["adapter"] / "iter_0", d)
    (d / "adapter_config.json").unlink()
    for wrong, message in ((LoraArguments(True, lora_r=8), r"these settings need \[8, \d+\] \(lora_A is \(r, in\): the file "
                                                           "has r=16\\)"),
                           (LoraArguments(True, lora_target_modules=["q_proj"]), "not produced by these LoRA settings")):
        with pytest.raises(ValueError, match=message):
            rebuild_adapter_config(d, settings_of(wrong), tiny_model)
        assert not (d / "adapter_config.json").exists()


def _change_weights(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_an_adapter_experiment_whose_base_model_changed_is_refused_naming_the_base(tiny_model, train_file, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    out = tmp_path / "exp"
    args = lora_args(base, train_file, out, "adapter", "--max_steps", "4", iterations=1)
    assert itertrain("train", *args).returncode == 0
    shutil.copytree(base, tmp_path / "copied")  # the same weights elsewhere: the reference holds (content)
    moved = [a if a != str(base) else str(tmp_path / "copied") for a in args]
    r = itertrain("status", str(out), "--json")
    assert json.loads(r.stdout)["plan"]["mode"] == "complete"
    _change_weights(base)
    before = tree_hash(out)
    r = itertrain("train", *args, "--num_iterations", "2", *AUTO)
    assert r.returncode == 2, r.output
    assert f"iter_0 is a LoRA adapter of the base model {base.resolve()}" in r.stderr
    assert "now has weights fingerprint" in r.stderr and "Put the original base model back" in r.stderr
    s = itertrain("status", str(out), "--num_iterations", "2")  # status predicts the same refusal
    assert s.returncode == 2 and "plan: refused — iter_0 is a LoRA adapter of the base model" in s.stdout, s.output
    assert tree_hash(out) == before
    r = itertrain("train", *moved, "--num_iterations", "2", "--allow_config_change", *AUTO)
    assert r.returncode == 0, r.output  # --model_name moved: same weights, same fingerprint


def test_an_adapter_directory_is_never_loaded_as_a_full_model_without_use_peft(uninterrupted, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(uninterrupted["adapter"], out)
    args = json.loads((out / "itertrain.json").read_text())["arguments"]
    flags = ["--model_name", args["model_name"], "--output_dir", str(out), "--train_file", args["train_file"],
             "--num_iterations", "3", *FAST_FLAGS, *AUTO]
    r = itertrain("train", *flags)
    assert r.returncode == 2 and "use_peft: True -> None" in r.stderr  # the record: a different experiment
    r = itertrain("train", *flags, "--allow_config_change")
    assert r.returncode == 2, r.output
    assert "iter_1: loading weights" not in r.stderr
    assert "iter_1 holds a LoRA adapter only, not full model weights: run with --use_peft" in r.stderr


def test_use_peft_without_peft_installed_exits_2_naming_the_extra(tiny_model, train_file, tmp_path):
    """An environment without PEFT: every installed package but peft, linked into one directory that is
    the whole import path (python -S: no site-packages)."""
    import os
    import site

    from conftest import PY, REPO, _run, base_env

    packages = Path(site.getsitepackages()[0])
    without = tmp_path / "site-packages-without-peft"
    without.mkdir()
    for entry in packages.iterdir():
        if not (entry.name == "peft" or entry.name.startswith("peft-")):
            (without / entry.name).symlink_to(entry)
    env = base_env({"PYTHONPATH": os.pathsep.join([str(REPO), str(without)])})
    probe = _run([PY, "-S", "-c", "import transformers, torch; import peft"], env, 300, None)
    assert "No module named 'peft'" in probe.stderr  # the environment really lacks PEFT
    r = _run([PY, "-S", "-m", "itertrain", "train", *lora_args(tiny_model, train_file, tmp_path / "exp", "merged")],
             env, 300, None)
    assert r.returncode == 2, r.output
    assert "--use_peft trains LoRA adapters with PEFT" in r.stderr and "pip install 'itertrain[lora]'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "exp").exists()


def test_adapter_mode_targeting_lm_head_commits_each_iteration_once_and_completes(tiny_model, train_file, tmp_path):
    # PEFT adds lm_head's base weight to the state it expects, but the adapter file never holds it: the
    # committed iter_0 was rejected and re-trained (and superseded) without end.
    out = tmp_path / "out"
    r = itertrain("train", *lora_args(tiny_model, train_file, out, "adapter", "--lora_r", "8",
                                      "--lora_target_modules", "q_proj", "lm_head"), timeout=240)
    assert r.returncode == 0, r.output
    assert "experiment complete: 2 iteration(s)" in r.output
    assert r.output.count("stage: commit") == 2
    assert not (out / "superseded").exists()
    assert (out / "iter_1" / "adapter_model.safetensors").is_file()


def test_a_committed_iteration_that_recovery_then_rejects_stops_the_run_instead_of_retraining_it(
        tiny_model, train_file, tmp_path):
    """iter_0 is damaged right after its commit (held there by a fault point): the next plan would train
    iteration 0 again; the run stops with exit 1 and one line naming why, and iter_0 is left where it is."""
    out, release = tmp_path / "out", tmp_path / "release"
    args = lora_args(tiny_model, train_file, out, "adapter", "--lora_r", "8")
    proc = subprocess.Popen([PY, "-m", "itertrain", "train", *args], cwd=REPO, start_new_session=True,
                            env=base_env({"ITERTRAIN_FAULT": f"iteration.after_manifest=hold:{release}"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        weights = out / "iter_0" / "adapter_model.safetensors"
        deadline = time.time() + 240
        while not (out / "iter_0" / "itertrain.manifest.json").exists():
            assert proc.poll() is None and time.time() < deadline, "iter_0 was never committed"
            time.sleep(0.1)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # a flipped bit in the tensor data: the manifest's hash no longer matches
        weights.write_bytes(bytes(data))
        release.touch()
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert "iteration 0 was committed, but recovery then planned iteration 0 again, so the run stops" in stderr
    assert stdout.count("stage: commit") == 1
    assert not (out / "superseded").exists() and (out / "iter_0" / "itertrain.manifest.json").exists()
