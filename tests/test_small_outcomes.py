"""Small wrong outcomes, each seen as a user sees it: a DPO iteration none of whose samples was scored,
a finished experiment on a read-only directory, superseded/ in status, an adapter whose base model is
gone, a torn leftover that recovery handles."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from conftest import FAST_FLAGS, itertrain

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs itertrain[dpo] (TRL)")


@pytest.mark.slow
@needs_trl
def test_dpo_whose_reward_function_scores_nothing_says_no_sample_was_scored(tmp_path, tiny_model):
    rng = random.Random(1)
    (tmp_path / "labeled.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
        for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(32))))
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in ((1, 2), (3, 4), (5, 6))))
    # Scores the launch check's batch (the first call; None for all of it is refused there, exit 2), then nothing.
    (tmp_path / "unscored.py").write_text("calls = []\n\n\ndef score(prompts, completions, **kwargs):\n"
                                          "    calls.append(1)\n"
                                          "    return [1.0 if len(calls) == 1 else None for _ in completions]\n")
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "iterative_dpo",
                  "--train_file", str(tmp_path / "labeled.jsonl"), "--prompts_file", str(tmp_path / "prompts.jsonl"),
                  "--num_iterations", "2", "--samples_per_prompt", "2", "--max_new_tokens", "2",
                  "--reward_fn", "unscored:score", *FAST_FLAGS, cwd=tmp_path)
    assert r.returncode == 1, r.output
    assert "no prompt gave a preference pair (none of the 6 samples was scored: the reward function returned None " \
           "for every one)" in r.stderr, r.output
    assert "min_reward_margin" not in r.stderr, r.output


def _can_mount_read_only() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp /tmp"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def read_only(directory, cmd: list[str]) -> list[str]:
    """`cmd` in a private mount namespace where `directory` is a read-only bind mount of itself (root
    ignores file permissions, so chmod -R a-w would prove nothing for a test running as root)."""
    d = str(directory)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount --bind '{d}' '{d}' && mount -o remount,ro,bind '{d}' '{d}' && exec \"$@\"", "sh", *cmd]


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_read_only(), reason="needs `unshare -m` and mount (root or CAP_SYS_ADMIN)")
def test_a_finished_experiment_on_a_read_only_directory_is_reported_complete_under_two_ranks(
        tmp_path, tiny_model, train_file):
    from conftest import PY, _run, base_env, free_port, tree_hash

    out = tmp_path / "exp"
    args = ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            *FAST_FLAGS, "--resume_from", "auto", "--resume_from_iteration", "auto"]
    assert itertrain("train", *args, "--num_iterations", "1").returncode == 0
    before = tree_hash(out)

    def torchrun_ro(*extra: str):
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "itertrain", "train", *args, *extra]
        return _run(read_only(tmp_path, cmd), base_env(), 600, None)

    r = torchrun_ro("--num_iterations", "1")
    assert r.returncode == 0, r.output
    assert f"✅ {out}: all 1 iterations are committed; nothing to do." in r.output
    r = torchrun_ro("--num_iterations", "2")  # more to do: refused in one line, nothing changed
    assert r.returncode == 1, r.output
    assert "itertrain: error: iteration 1 cannot run: could not write " in r.output and "(EROFS)" in r.output, r.output
    assert tree_hash(out) == before


@pytest.mark.slow
def test_verify_reports_a_torn_leftover_and_exits_0_and_status_lists_superseded(tmp_path, sft_args):
    out = tmp_path / "exp"
    r = itertrain("train", *sft_args(out, iterations=1), fault="checkpoint.optimizer=kill#2")  # checkpoint-8 torn
    assert r.returncode == -9, r.output
    v = itertrain("verify", str(out))
    assert v.returncode == 0, v.output
    line = next(ln for ln in v.stdout.splitlines() if "checkpoint-8" in ln)
    assert line.startswith("🧹") and "a save that never completed; never used, the next launch removes it" in line
    assert "1 torn leftover(s) of a save that never completed (not a failure" in v.stdout
    report = json.loads(itertrain("verify", str(out), "--json").stdout)
    assert report["ok"] is True and {a["path"]: a.get("leftover") for a in report["artifacts"]}["checkpoint-8"]

    # --overwrite_output_dir moves the committed work aside: status names it
    r = itertrain("train", *sft_args(out, "--max_steps", "4", iterations=1), "--overwrite_output_dir")
    assert r.returncode == 0, r.output
    (aside,) = (out / "superseded").iterdir()
    s = itertrain("status", str(out))
    assert s.returncode == 0, s.output
    assert f"🗄️  superseded/{aside.name}/" in s.stdout and "checkpoint-4" in s.stdout.split("superseded/")[1], s.stdout
    assert json.loads(itertrain("status", str(out), "--json").stdout)["superseded"] == [
        {"path": f"superseded/{aside.name}", "artifacts": sorted(p.name for p in aside.iterdir())}]


@pytest.mark.slow
def test_an_adapter_whose_base_model_was_deleted_fails_status_and_verify_and_the_launch_says_missing(
        tmp_path, tiny_model, train_file):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    out = tmp_path / "exp"
    args = ["--model_name", str(base), "--output_dir", str(out), "--train_file", str(train_file), *FAST_FLAGS,
            "--max_steps", "4", "--use_peft", "--iteration_model", "adapter"]
    assert itertrain("train", *args, "--num_iterations", "1").returncode == 0
    shutil.rmtree(base)
    s = itertrain("status", str(out))
    assert s.returncode == 1, s.output
    assert f"❌ iter_0: its LoRA base model {base.resolve()} is missing" in s.stdout, s.stdout
    v = itertrain("verify", str(out))
    assert v.returncode == 1 and "iter_0 " in v.stdout and "is missing" in v.stdout, v.output
    s = itertrain("status", str(out), "--num_iterations", "2")  # a plan that would apply the adapter
    assert s.returncode == 2, s.output
    assert f"which is missing (no weights at {base.resolve()})" in s.stdout and "fingerprint None" not in s.stdout, \
        s.stdout
