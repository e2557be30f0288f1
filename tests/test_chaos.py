"""The kill-anywhere guarantee under scripts/chaos.py, one test per mode: expert iteration (`--ci`),
iterative DPO, GRPO, `--async_save`, LoRA adapters (merged and adapter-only). Each runs an uninterrupted reference,
then SIGKILLs torchrun and both ranks at every save path and at random moments, relaunching with auto/auto
after each, and compares every iter_K and every data/iter_K with the reference byte for byte. (In a file of
their own, first in the alphabet after the fast ones: they are the longest, and xdist starts them early.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, base_env

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills


def chaos(tmp_path, *flags: str, timeout: int, data: int = 2) -> tuple[subprocess.CompletedProcess, dict]:
    """Run scripts/chaos.py and check what every mode must give: progress never lost, no difference, the
    3 iterations and `data` data directories identical to the uninterrupted reference."""
    report = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), *flags, "--workdir", str(tmp_path / "w"),
                        "--report", str(report)], capture_output=True, text=True, env=base_env(), timeout=timeout)
    summary = json.loads(report.read_text())
    assert summary["progress_ok"], summary["differences"]
    assert summary["differences"] == [], summary["differences"]
    assert summary["identical_iterations"] == summary["total_iterations"] == 3
    assert summary["identical_data"] == summary["total_data"] == data
    assert r.returncode == 0
    return r, summary


def test_kills_at_every_save_path_give_byte_identical_iteration_models(tmp_path):
    """scripts/chaos.py --ci: a reference run, then >= 6 SIGKILLs of torchrun and both ranks (inside a
    checkpoint save, a manifest write, an iteration commit, a data commit, generation, and after a
    commit), each followed by an auto/auto relaunch; every iter_K must equal the reference byte for byte."""
    r, summary = chaos(tmp_path, "--ci", timeout=900)
    assert summary["kills_done"] >= 6, r.stdout[-3000:]


def test_iterative_dpo_kills_anywhere_give_byte_identical_iteration_models_and_pairs(tmp_path):
    """scripts/chaos.py --ci --strategy iterative_dpo, at the size of the expert-iteration run above: SIGKILLs
    of torchrun and both ranks inside generation, inside the data commit, in the middle of DPO training,
    inside a DPO checkpoint save and its manifest, and between an iteration's commit and its clean-up,
    each followed by an auto/auto relaunch; every iter_K, samples.jsonl and pairs.jsonl must equal the
    uninterrupted run's byte for byte."""
    r, summary = chaos(tmp_path, "--ci", "--strategy", "iterative_dpo", timeout=1800)
    killed = {launch["kill"] for launch in summary["launches"] if launch["killed"]}
    assert {"generation.batch", "manifest.data.write", "train.step", "checkpoint.optimizer",
            "manifest.trainer_checkpoint.write", "iteration.after_manifest"} <= killed, r.stdout[-3000:]
    assert summary["kills_done"] >= 7, r.stdout[-3000:]


def test_grpo_kills_inside_generation_blocks_give_byte_identical_iteration_models(tmp_path):
    """scripts/chaos.py --ci --strategy grpo: SFT, then two GRPO iterations on TRL's GRPOTrainer (a generation
    every 2 steps, checkpoints every 4); SIGKILLs of torchrun and both ranks at steps inside generation blocks,
    inside a checkpoint save and its manifest, while TRL loads the reference model, after an iteration's
    commit and at a random moment, each followed by an auto/auto relaunch; every iter_K and its metrics must
    equal the uninterrupted run's."""
    r, summary = chaos(tmp_path, "--ci", "--strategy", "grpo", timeout=1800, data=0)
    killed = {launch["kill"] for launch in summary["launches"] if launch["killed"]}
    assert {"train.step", "checkpoint.optimizer", "reference.load", "manifest.trainer_checkpoint.write",
            "iteration.after_manifest"} <= killed, r.stdout[-3000:]
    # a relaunch continued a checkpoint of an RL iteration after a kill inside the next block
    assert any(launch["resumed_at"] and launch["resumed_at"][0] >= 1 and launch["resumed_at"][1] > 0
               for launch in summary["launches"]), summary["launches"]


def test_kills_inside_the_async_writer_give_the_iteration_models_of_synchronous_saves(tmp_path):
    """scripts/chaos.py --ci --async_save: the reference run saves synchronously; the killed runs save
    with --async_save and are SIGKILLed (torchrun and both ranks) inside the background writer while it
    is mid-file (model.safetensors, optimizer.pt), once a rank's files are durable but not committed,
    inside the commit, and at every other save path; every iter_K must equal the reference byte for byte."""
    r, summary = chaos(tmp_path, "--ci", "--async_save", timeout=2400)
    assert summary["async_save"]
    killed = [launch["kill"] for launch in summary["launches"] if launch["killed"]]
    assert {"checkpoint.write.weights", "checkpoint.write.optimizer", "checkpoint.write.done"} <= set(killed), \
        r.stdout[-3000:]
    assert summary["kills_done"] >= 10, r.stdout[-3000:]


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_chaos_kills_with_lora_including_a_damaged_newest_checkpoint_give_byte_identical_iteration_models(
        mode, tmp_path):
    """scripts/chaos.py --ci --lora MODE: expert iteration on 2 ranks, a reference run, then SIGKILLs at every
    save path and a random moment, and once the newest committed adapter checkpoint damaged after the kill;
    every iter_K (merged weights, or adapter + config) and every data/iter_K must equal the reference."""
    r, summary = chaos(tmp_path, "--ci", "--lora", mode, timeout=2400)
    assert summary["kills_done"] >= 6, r.stdout[-3000:]
    fallback = [rej for launch in summary["launches"] for rej in launch["rejected"]]
    assert any(rej.startswith("checkpoint-8: verification failed: adapter_model.safetensors checksum mismatch")
               for rej in fallback), summary["launches"]
