"""Issue: the loop, committed artifacts, torchrun, argument handling (real processes, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import itertrain, manifest, torchrun, weights

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills


def _assert_committed_experiment(out: Path, base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for k in (0, 1):
        AutoModelForCausalLM.from_pretrained(out / f"iter_{k}")  # a self-contained HF model dir
        AutoTokenizer.from_pretrained(out / f"iter_{k}")
        assert (out / f"iter_{k}" / "generation_config.json").exists()
        m = manifest(out / f"iter_{k}")
        assert (m["kind"], m["iteration"]) == ("iteration_model", k)
    w0, w1, wb = weights(out / "iter_0"), weights(out / "iter_1"), weights(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w0[name], wb[name]), "iteration 0 did not train"
    assert not torch.equal(w1[name], w0[name]), "iteration 1 did not start a new round of training"
    assert manifest(out / "iter_1")["lineage"]["weights_from"] == "iter_0"
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("iter_*/checkpoint-*"))
    r = itertrain("verify", str(out))
    assert r.returncode == 0, r.output
    record = json.loads((out / "itertrain.json").read_text())
    assert record["arguments"]["num_iterations"] == 2 and record["launches"]


def test_two_iteration_sft_commits_two_self_contained_models(tmp_path, sft_args, tiny_model):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out))
    assert r.returncode == 0, r.output
    assert "CHECKPOINT RECOVERY SYSTEM" in r.stdout
    _assert_committed_experiment(out, tiny_model)
    rows = [json.loads(x) for x in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["eval_train_loss"] > 0 for r in rows)  # no --eval_file: the loss on training rows, named so


def test_two_rank_torchrun_run_commits_the_same_layout(tmp_path, sft_args, tiny_model):
    out = tmp_path / "exp"
    r = torchrun(*sft_args(out))
    assert r.returncode == 0, r.output
    _assert_committed_experiment(out, tiny_model)
    assert manifest(out / "iter_0")["world_size"] == 2


def test_keep_iteration_checkpoints_moves_them_into_the_iteration_model(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out, "--keep_iteration_checkpoints", "true"))
    assert r.returncode == 0, r.output
    assert not list(out.glob("checkpoint-*"))
    assert sorted(p.name for p in (out / "iter_1").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4",
                                                                              "checkpoint-8"]
    assert manifest(out / "iter_1" / "checkpoint-8")["iteration"] == 1
    assert itertrain("verify", str(out)).returncode == 0


@pytest.mark.parametrize("point", ["checkpoint.save", "checkpoint.commit"])
def test_save_total_limit_rotates_only_after_commit_and_keeps_the_newest(tmp_path, sft_args, point):
    """Killed at the third save (before HF writes it, or after HF wrote it and before its manifest):
    limit 1 has rotated checkpoint-4 away after checkpoint-8 committed, and nothing more."""
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out, "--save_total_limit", "1", "--async_commit", "false"),
                  fault=f"{point}=kill#3")
    assert r.returncode == -9, r.output
    committed = sorted(p.name for p in out.glob("checkpoint-*") if (p / "itertrain.manifest.json").exists())
    assert committed == ["checkpoint-8"]
    assert manifest(out / "checkpoint-8")["step"] == 8
    if point == "checkpoint.commit":  # written, never committed: torn, and rotation did not act on it
        assert (out / "checkpoint-12" / "model.safetensors").exists()


def test_optimizer_moments_carry_across_the_iteration_boundary_numerically(tmp_path, sft_args):
    """Adam's per-parameter step counters and moments continue from iteration 0's last checkpoint into
    iteration 1 (and do not under --iteration_init base)."""
    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, "--keep_iteration_checkpoints", "true")).returncode == 0
    end0 = torch.load(out / "iter_0" / "checkpoint-12" / "optimizer.pt", weights_only=True)["state"]
    start1 = torch.load(out / "iter_1" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert {float(v["step"]) for v in end0.values()} == {12.0}
    assert {float(v["step"]) for v in start1.values()} == {16.0}  # 12 carried + 4 new
    # The second moments continued too: with beta2 = 0.999, 4 more steps keep ~all of the 12 steps'
    # accumulation (a fresh optimizer would hold about a third of it).
    total = sum(v["exp_avg_sq"].sum().item() for v in start1.values())
    before = sum(v["exp_avg_sq"].sum().item() for v in end0.values())
    assert total > 0.8 * before, (total, before)
    base = tmp_path / "base"
    assert itertrain("train", *sft_args(base, "--keep_iteration_checkpoints", "true", "--iteration_init", "base")
                     ).returncode == 0
    fresh = torch.load(base / "iter_1" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert {float(v["step"]) for v in fresh.values()} == {4.0}


def test_sigkill_inside_a_checkpoint_save_leaves_no_manifest(tmp_path, sft_args):
    out = tmp_path / "exp"
    # Killed after the weights of checkpoint-8 are written, before its optimizer state.
    r = itertrain("train", *sft_args(out), fault="checkpoint.optimizer=kill#2")
    assert r.returncode == -9  # SIGKILL
    assert (out / "checkpoint-8" / "model.safetensors").exists()
    assert not (out / "checkpoint-8" / "itertrain.manifest.json").exists()
    assert (out / "checkpoint-4" / "itertrain.manifest.json").exists()
    status = json.loads(itertrain("status", str(out), "--json").stdout)
    by_path = {c["path"]: c["status"] for c in status["inventory"]["checkpoints"]}
    assert by_path == {"checkpoint-4": "committed", "checkpoint-8": "torn"}
    assert status["plan"]["state_from"] == "checkpoint-4"


def test_verifier_detects_wrong_size_and_wrong_checksum(tmp_path):
    from itertrain.artifacts.manifest import commit_directory, read_manifest, verify_checksums

    d = tmp_path / "artifact"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x" * 1000)
    (d / "b.bin").write_bytes(b"y" * 10)
    commit_directory(d, kind="data", iteration=0, step=0)
    m = read_manifest(d)
    assert verify_checksums(d, m) == []
    raw = bytearray((d / "a.bin").read_bytes())
    raw[500] ^= 1
    (d / "a.bin").write_bytes(bytes(raw))
    assert any("a.bin checksum mismatch" in p for p in verify_checksums(d, m))
    (d / "b.bin").write_bytes(b"y" * 9)
    assert any("b.bin has 9 bytes" in p for p in verify_checksums(d, m))


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--resume_from", "abc", "--resume_from 'abc' is not valid"),
        ("--resume_from_iteration", "iter_x", "--resume_from_iteration 'iter_x' is not valid"),
        ("--resume_from_iteration", "../x", "--resume_from_iteration '../x' is not valid"),
        ("--num_iterations", "0", "--num_iterations 0"),
        ("--strategy", "dpo", "invalid choice"),
    ],
)
def test_bad_flag_values_exit_2_with_a_message_and_write_nothing(tmp_path, sft_args, flag, value, expected):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out), flag, value)
    assert r.returncode == 2, r.output
    assert expected in r.stderr
    assert r.stderr.count("\n") <= 2, "one readable message, no traceback"
    assert not out.exists()


def test_missing_model_path_exits_2_and_says_what_to_type(tmp_path, sft_args):
    out = tmp_path / "exp"
    args = sft_args(out)
    args[args.index("--model_name") + 1] = str(tmp_path / "no-such-model")
    r = itertrain("train", *args)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "itertrain init-model" in r.stderr
    assert not out.exists()


def test_yaml_config_is_read_and_command_line_flags_override_it(tmp_path, sft_args):
    out = tmp_path / "exp"
    args = sft_args(out, iterations=1)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("num_iterations: 1\nmax_steps: 8\nsave_steps: 4\nlearning_rate: 0.001\n")
    i = args.index("--max_steps")
    args[i:i + 2] = []
    r = itertrain("train", "--config", str(cfg), *args, "--save_steps", "8")
    assert r.returncode == 0, r.output
    m = manifest(out / "iter_0")
    assert m["step"] == 8  # max_steps from YAML
    record = json.loads((out / "itertrain.json").read_text())
    assert record["arguments"]["save_steps"] == 8  # the command line won over the YAML's 4


def test_init_model_writes_a_loadable_tiny_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    n = sum(p.numel() for p in model.parameters())
    assert 500_000 < n < 2_000_000
    assert tok.decode(tok("12+34=46", add_special_tokens=False)["input_ids"]) == "12+34=46"
