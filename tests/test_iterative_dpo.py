"""iterative_dpo: pairing, TRL's flags, the reference-model rule, and real 2-rank runs of TRL's DPOTrainer
killed in the middle of DPO training (byte-identical on resume), refused when the reference changed,
and scored by a reward model sharded over ranks."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, arithmetic_files, itertrain, manifest, relaunched_with_base_reference, torchrun

RESUME = ("--resume_from", "auto", "--resume_from_iteration", "auto")
# TRL is the extra itertrain[dpo]: the lower-bound check (scripts/check_lowest.sh) runs without it.
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")
# A batched reward in TRL's form that prefers digits and the answer's length: the untrained tiny model is
# never exactly right, and exact match would give no pair at all.
REWARD = """def score(prompts, completions, answer, **kwargs):
    return [sum(ch.isdigit() for ch in c) - abs(len(c) - len(a)) for c, a in zip(completions, answer)]
"""


# ---- pure parts ---------------------------------------------------------------------------------------------
@needs_trl
def test_pairs_take_the_best_and_worst_sample_and_drop_prompts_below_the_margin():
    from itertrain.strategies.iterative_dpo import make_pairs, pair_stats

    rows = [{"prompt": f"p{i}"} for i in range(5)]
    completions = [["a", "b", "c"], ["a", "b"], ["a", "b", "c"], ["same", "same"], ["a", "b", "c"]]
    rewards = [[0.0, 1.0, 1.0],  # ties for best: the first sample wins
               [0.5, 0.5],  # no preference: no pair
               [0.2, 0.25, None],  # margin 0.05 < 0.1: no pair (None: not scored)
               [0.0, 1.0],  # the same text twice: no pair
               [3.0, None, -1.0]]
    pairs = make_pairs(rows, completions, rewards, min_margin=0.1)
    assert [(p["example"], p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [(0, "b", "a", 1.0), (4, "a", "c", 4.0)]
    stats = pair_stats(rows, rewards, pairs)
    assert stats["pairs"] == 2 and stats["prompts"] == 5 and stats["samples"] == 13 and stats["pair_rate"] == 0.4
    assert make_pairs(rows, completions, rewards, min_margin=5.0) == []


@needs_trl
def test_trl_eval_metrics_are_renamed_under_the_prefix_and_token_counts_dropped():
    from itertrain.strategies.iterative_dpo import dpo_metrics

    trl = {"eval_train_loss": 0.5, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.2,
           "eval_num_tokens": 123.0, "eval_train_runtime": 0.1, "eval_entropy": 3.0, "epoch": 2.0}
    assert dpo_metrics(trl, "eval_train") == {"eval_train_loss": 0.5, "eval_train_rewards/accuracies": 1.0,
                                               "eval_train_rewards/margins": 0.2}
    assert dpo_metrics({"eval_loss": 0.6, "eval_rewards/margins": 0.1}, "eval") == {"eval_loss": 0.6,
                                                                                   "eval_rewards/margins": 0.1}


@needs_trl
def test_dpo_fields_pass_through_under_trl_names_with_itertrain_defaults(model_dir, tmp_path):
    from trl import DPOConfig

    from itertrain.parser import parse_train_args

    cfg = parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                            "--strategy", "iterative_dpo", "--beta", "0.3", "--loss_type", "sigmoid", "sft",
                            "--loss_weights", "1.0", "0.5", "--max_length", "48", "--ref_model", "base",
                            "--min_reward_margin", "0.5"])
    t = cfg.training
    assert isinstance(t, DPOConfig)
    assert (t.beta, t.loss_type, t.loss_weights, t.max_length) == (0.3, ["sigmoid", "sft"], [1.0, 0.5], 48)
    assert cfg.loop.max_seq_length == 48  # one --max_length: the SFT iteration's examples are truncated to it too
    assert (cfg.strategy_args.ref_model, cfg.strategy_args.min_reward_margin) == ("base", 0.5)
    # TRL's learning rate and logging defaults; bf16 and activation checkpointing stay off unless asked for
    assert (t.learning_rate, t.logging_steps, t.bf16, t.activation_checkpointing) == (1e-6, 10, False, False)
    assert not t.trust_remote_code and not cfg.model.trust_remote_code  # one flag, itertrain's


@needs_trl
@pytest.mark.parametrize("flag", ["--precompute_ref_log_probs", "--sync_ref_model"])
def test_trl_options_that_keep_reference_state_outside_the_checkpoints_are_refused(model_dir, tmp_path, flag):
    from itertrain.errors import UsageError
    from itertrain.parser import parse_train_args

    with pytest.raises(UsageError, match=f"{flag} is not supported by iterative_dpo"):
        parse_train_args(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                          "--strategy", "iterative_dpo", flag, "true"])


def test_iterative_dpo_without_trl_exits_2_naming_the_extra(model_dir, tmp_path, monkeypatch, capsys):
    from itertrain.cli import main

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError, as when it is not installed
    monkeypatch.delitem(sys.modules, "itertrain.strategies.iterative_dpo", raising=False)
    code = main(["train", "--model_name", str(model_dir), "--output_dir", str(tmp_path / "o"), "--task", "arithmetic",
                 "--strategy", "iterative_dpo"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pip install 'itertrain[dpo]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- real runs: torchrun, 2 ranks, TRL's DPOTrainer ----------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dpo")
    arithmetic_files(d, prompts=20, top=500)
    (d / "dpo_reward.py").write_text(REWARD)
    return d


def dpo_args(tiny_model: Path, files: Path, out: Path, *extra: str) -> list[str]:
    # --async_commit false: checkpoint-4 is committed before step 5, so a kill at step 6 resumes from it
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "iterative_dpo",
            "--train_file", str(files / "labeled.jsonl"), "--prompts_file", str(files / "prompts.jsonl"),
            "--num_iterations", "2", "--samples_per_prompt", "3", "--max_new_tokens", "4",
            "--generation_batch_size", "8", "--reward_fn", "dpo_reward:score", "--async_commit", "false",
            *FAST_FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, dpo_files) -> Path:
    out = tmp_path_factory.mktemp("dpo-ref") / "exp"
    r = torchrun(*dpo_args(tiny_model, dpo_files, out), cwd=dpo_files)
    assert r.returncode == 0, r.output
    return out


@pytest.fixture(scope="module")
def killed_in_dpo(tmp_path_factory, tiny_model, dpo_files) -> Path:
    """A 2-rank run SIGKILLed (torchrun and both ranks) at step 6 of iteration 1's DPO training (iteration 0
    has 12 steps), after DPO checkpoint-4 was committed."""
    out = tmp_path_factory.mktemp("dpo-killed") / "exp"
    r = torchrun(*dpo_args(tiny_model, dpo_files, out), fault="train.step=kill#18", cwd=dpo_files)
    assert r.returncode != 0
    assert (out / "checkpoint-4" / "itertrain.manifest.json").exists() and not (out / "iter_1").exists()
    assert manifest(out / "checkpoint-4")["iteration"] == 1
    return out


@pytest.mark.slow
@needs_trl
def test_iteration_commits_samples_pairs_stats_and_the_reference_in_its_lineage(reference):
    m = manifest(reference / "data" / "iter_1")
    assert m["kind"] == "data" and sorted(m["files"]) == ["pairs.jsonl", "samples.jsonl", "stats.json"]
    assert m["lineage"] == {"weights_from": "iter_0", "weights_id": m["extra"]["weights_id"]}
    samples = [json.loads(x) for x in (reference / "data/iter_1/samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (reference / "data/iter_1/pairs.jsonl").read_text().splitlines()]
    assert len(samples) == 60 and pairs and all(p["chosen_reward"] - p["rejected_reward"] >= 0.1 for p in pairs)
    best = {i: max(s["reward"] for s in samples if s["example"] == i) for i in {p["example"] for p in pairs}}
    assert all(p["chosen_reward"] == best[p["example"]] for p in pairs)
    assert m["extra"]["stats"]["pairs"] == len(pairs)
    # The DPO iteration's checkpoints and model name its reference: iter_0, by fingerprint.
    lineage = manifest(reference / "iter_1")["lineage"]
    from itertrain.artifacts.manifest import fingerprint

    assert (lineage["ref_model"], lineage["ref_model_id"]) == ("iter_0", fingerprint(reference / "iter_0"))
    assert manifest(reference / "iter_1")["world_size"] == 2
    assert not (reference / "README.md").exists()  # TRL's model card stays out of the experiment
    metrics = [json.loads(x) for x in (reference / "runs/metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["pairs"] == len(pairs) and "eval_train_rewards/accuracies" in metrics[1]


@pytest.mark.slow
@needs_trl
def test_two_rank_dpo_killed_mid_training_of_iteration_1_resumes_byte_identical(tmp_path, tiny_model, dpo_files,
                                                                                 reference, killed_in_dpo):
    out = tmp_path / "exp"
    shutil.copytree(killed_in_dpo, out)
    r = torchrun(*dpo_args(tiny_model, dpo_files, out), *RESUME, cwd=dpo_files)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 4" in r.stdout
    assert "♻️  reusing committed data/iter_1" in r.stdout
    for name in ("iter_0/model.safetensors", "iter_1/model.safetensors", "data/iter_1/pairs.jsonl"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert manifest(out / "iter_1")["extra"]["metrics"]["train_loss"] == \
        manifest(reference / "iter_1")["extra"]["metrics"]["train_loss"]


@pytest.mark.slow
@needs_trl
def test_resuming_dpo_against_a_different_reference_model_is_refused_naming_both(tmp_path, tiny_model, dpo_files,
                                                                                killed_in_dpo):
    from itertrain.artifacts.manifest import fingerprint

    out = tmp_path / "exp"
    r = relaunched_with_base_reference(killed_in_dpo, out, *dpo_args(tiny_model, dpo_files, out), *RESUME, cwd=dpo_files)
    assert "checkpoint-4 of iteration 1 was trained against the reference model iter_0 (fingerprint " \
           f"{fingerprint(out / 'iter_0')})" in r.stderr
    assert f"this launch's reference is base model {tiny_model} (fingerprint {fingerprint(tiny_model)})" in r.stderr


@pytest.mark.slow
@needs_trl
def test_reward_model_scores_every_sample_on_two_ranks_as_one_process_would(tmp_path, tiny_model, dpo_files):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from test_rewards import make_reward_model

    rm = make_reward_model(tmp_path / "reward-model")
    out = tmp_path / "exp"
    args = [a for a in dpo_args(tiny_model, dpo_files, out) if a not in ("--reward_fn", "dpo_reward:score")]
    r = torchrun(*args, "--reward_model", str(rm), "--min_reward_margin", "0", cwd=dpo_files)
    assert r.returncode == 0, r.output
    samples = [json.loads(x) for x in (out / "data/iter_1/samples.jsonl").read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tok = AutoTokenizer.from_pretrained(rm)
    with torch.no_grad():
        alone = [model(**tok(s["prompt"] + s["completion"], return_tensors="pt")).logits[0, 0].item() for s in samples]
    assert [s["reward"] for s in samples] == pytest.approx(alone, abs=1e-5)
    pairs = [json.loads(x) for x in (out / "data/iter_1/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 10  # continuous scores: a prompt gives no pair only when its samples are one text
    assert all(p["chosen_reward"] == max(s["reward"] for s in samples if s["example"] == p["example"]) for p in pairs)
    assert manifest(out / "data/iter_1")["extra"]["settings"]["reward_model"] == str(rm)


@pytest.mark.slow
@needs_trl
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs itertrain[lora] (PEFT)")
def test_dpo_on_lora_adapters_killed_mid_training_resumes_byte_identical_against_the_adapter_reference(
        tmp_path, tiny_model, dpo_files):
    """--use_peft --iteration_model adapter: iteration 1 continues iter_0's adapter with DPO, against the
    reference iter_0 = the base model plus iter_0's adapter (never the bare base, TRL's default for PEFT)."""
    lora = ("--use_peft", "--iteration_model", "adapter", "--lora_r", "4")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = itertrain("train", *dpo_args(tiny_model, dpo_files, ref, *lora), cwd=dpo_files, timeout=600)
    assert r.returncode == 0, r.output
    from itertrain.artifacts.manifest import fingerprint

    lineage = manifest(ref / "iter_1")["lineage"]
    assert (lineage["ref_model"], lineage["ref_model_id"]) == ("iter_0", fingerprint(ref / "iter_0"))
    assert not (ref / "iter_1" / "model.safetensors").exists()  # the adapter only
    r = itertrain("train", *dpo_args(tiny_model, dpo_files, out, *lora), fault="train.step=kill#18", cwd=dpo_files,
                  timeout=600)
    assert r.returncode != 0 and manifest(out / "checkpoint-4")["iteration"] == 1, r.output
    r = itertrain("train", *dpo_args(tiny_model, dpo_files, out, *lora), *RESUME, cwd=dpo_files, timeout=600)
    assert r.returncode == 0, r.output
    assert "Continuing at: iteration 1, step 4" in r.stdout
    for name in ("iter_0/adapter_model.safetensors", "iter_1/adapter_model.safetensors", "iter_1/adapter_config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.slow
@needs_trl
def test_async_save_with_iterative_dpo_commits_dpotrainers_own_checkpoints(tmp_path, tiny_model, dpo_files):
    """TRL's DPOTrainer has its own _save_checkpoint: --async_save runs it, and only HF's two large
    writes move to the background; the checkpoints and iteration models are those of a synchronous run."""
    keep = "--keep_iteration_checkpoints"  # iter_K/checkpoint-*: the DPO checkpoints stay to compare
    sync, out = tmp_path / "sync", tmp_path / "async"
    assert torchrun(*dpo_args(tiny_model, dpo_files, sync, keep), cwd=dpo_files).returncode == 0
    r = torchrun(*dpo_args(tiny_model, dpo_files, out, keep, "--async_save"), cwd=dpo_files)
    assert r.returncode == 0, r.output
    assert "--async_save is not available" not in r.output
    for name in ("iter_0/model.safetensors", "iter_1/model.safetensors"):
        assert (out / name).read_bytes() == (sync / name).read_bytes(), name
    checkpoints = sorted(p.relative_to(sync) for p in sync.glob("iter_1/checkpoint-*"))
    assert checkpoints and checkpoints == sorted(p.relative_to(out) for p in out.glob("iter_1/checkpoint-*"))
    for c in checkpoints:  # training_args.bin pickles the output dir, which differs
        ours, theirs = manifest(out / c)["files"], manifest(sync / c)["files"]
        ours.pop("training_args.bin"), theirs.pop("training_args.bin")
        assert ours == theirs, c


@needs_trl
def test_min_pairs_stops_an_iteration_with_fewer_pairs_and_names_the_value_that_would_train(tmp_path):
    from types import SimpleNamespace

    from itertrain.errors import TrainingFailed
    from itertrain.strategies.iterative_dpo import DPOArguments, IterativeDPOStrategy

    pairs = tmp_path / "data" / "iter_1" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"}) + "\n"
                             for i in range(3)))

    def strategy(min_pairs: int) -> IterativeDPOStrategy:
        cfg = SimpleNamespace(strategy_args=DPOArguments(min_pairs=min_pairs))
        return IterativeDPOStrategy(SimpleNamespace(cfg=cfg, root=tmp_path))

    with pytest.raises(TrainingFailed, match=r"iteration 1: the samples gave 3 preference pairs, fewer than "
                                             r"--min_pairs 4, .*data/iter_1 stays committed: relaunch with "
                                             r"--min_pairs 3 \(or lower\)"):
        strategy(4).train_rows(1)
    assert len(strategy(3).train_rows(1)) == 3 == len(strategy(0).train_rows(1))
