"""The strategy plug-in API with real processes: a user strategy in its own module outside the
repository, `register_strategy` + `itertrain.run` from a user script with its own Trainer subclass,
and a Trainer class that would bypass the commit protocol."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import FAST_FLAGS, PY, base_env, itertrain, manifest, torchrun, _run

pytestmark = pytest.mark.slow  # real processes: torchrun, training, kills

SMALLEST = textwrap.dedent("""
    from itertrain import Strategy

    class MyStrategy(Strategy):
        def train_rows(self, iteration):
            return [{"prompt": f"{a}+{iteration}=", "completion": str(a + iteration)} for a in range(40)]
""")


def test_user_strategy_module_outside_the_repo_runs_two_iterations_under_torchrun(tmp_path, tiny_model):
    work = tmp_path / "project"
    work.mkdir()
    (work / "mymod.py").write_text(SMALLEST)
    out = tmp_path / "exp"
    r = torchrun("--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "mymod:MyStrategy",
                 "--num_iterations", "2", *FAST_FLAGS, cwd=work)
    assert r.returncode == 0, r.output
    assert [manifest(out / f"iter_{k}")["iteration"] for k in (0, 1)] == [0, 1]
    assert manifest(out / "iter_1")["world_size"] == 2
    assert json.loads((out / "itertrain.json").read_text())["arguments"]["strategy"] == "mymod:MyStrategy"
    # The same strategy name from another directory cannot be imported: exit 2 before anything is written.
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(tmp_path / "other"),
                  "--strategy", "mymod:MyStrategy", *FAST_FLAGS, cwd=tmp_path)
    assert r.returncode == 2 and "cannot import mymod" in r.stderr, r.output
    assert not (tmp_path / "other").exists()


SCRIPT = textwrap.dedent("""
    import sys
    from transformers import Trainer
    from itertrain import Strategy, register_strategy, run

    class CountingTrainer(Trainer):
        saves = 0

        def _save_checkpoint(self, model, trial):
            type(self).saves += 1
            print(f"user save hook {type(self).saves}", flush=True)
            super()._save_checkpoint(model, trial)

    @register_strategy("counting")
    class Counting(Strategy):
        def train_rows(self, iteration):
            return [{"text": f"{a} {iteration}"} for a in range(40)]

        def trainer_class(self):
            return CountingTrainer

    if __name__ == "__main__":
        sys.exit(run())
""")


def test_register_strategy_and_run_keep_the_hooks_of_a_user_trainer_subclass(tmp_path, tiny_model):
    (tmp_path / "train_mine.py").write_text(SCRIPT)
    out = tmp_path / "exp"
    args = ["--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "counting", *FAST_FLAGS]
    r = _run([PY, str(tmp_path / "train_mine.py"), *args], base_env({"ITERTRAIN_FAULT": "checkpoint.commit=kill#3"}),
             300, tmp_path)
    assert r.returncode == -9, r.output
    assert "user save hook 3" in r.stdout  # the user's override ran, inside itertrain's save
    assert (out / "checkpoint-8" / "itertrain.manifest.json").exists()  # and itertrain committed around it
    assert not (out / "checkpoint-12" / "itertrain.manifest.json").exists()
    r = _run([PY, str(tmp_path / "train_mine.py"), *args, "--resume_from", "auto", "--resume_from_iteration", "auto"],
             base_env(), 300, tmp_path)
    assert r.returncode == 0, r.output
    assert "removed torn checkpoint-12" in r.stdout and "Continuing at: iteration 0, step 8" in r.stdout
    assert manifest(out / "iter_0")["step"] == 12


BAD_ORDER = textwrap.dedent("""
    from transformers import Trainer
    from itertrain import RecoveryHooks, Strategy

    class Sneaky(Trainer):
        def _save_checkpoint(self, model, trial):
            pass  # would write nothing and commit nothing

    class Wrong(Sneaky, RecoveryHooks):
        pass

    class BadOrder(Strategy):
        def train_rows(self, iteration):
            return [{"text": "x"}] * 8

        def trainer_class(self):
            return Wrong
""")


def test_trainer_class_that_bypasses_the_hooks_is_refused_before_anything_is_written(tmp_path, tiny_model):
    (tmp_path / "badmod.py").write_text(BAD_ORDER)
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "badmod:BadOrder",
                  *FAST_FLAGS, cwd=tmp_path)
    assert r.returncode == 2, r.output
    assert ("Sneaky._save_checkpoint, Trainer._save, Trainer._save_optimizer_and_scheduler, Trainer._load_from_checkpoint, "
            "Trainer._finalize_training come "
            "before itertrain's RecoveryHooks") in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


ROTATING = textwrap.dedent("""
    from itertrain import Strategy

    class Rotating(Strategy):
        def train_rows(self, iteration):
            return [{"prompt": f"{a}+{iteration}=", "completion": str(a + iteration)} for a in range(40)]

        def training_arguments(self, iteration, args):
            args.save_total_limit = 2
            return args
""")


def test_strategy_that_turns_on_hf_checkpoint_rotation_is_a_usage_error_before_training(tmp_path, tiny_model):
    (tmp_path / "rotmod.py").write_text(ROTATING)
    out = tmp_path / "exp"
    r = itertrain("train", "--model_name", str(tiny_model), "--output_dir", str(out), "--strategy", "rotmod:Rotating",
                  *FAST_FLAGS, cwd=tmp_path)
    assert r.returncode == 2, r.output
    assert "training_arguments set save_total_limit=2" in r.stderr and "--save_total_limit" in r.stderr, r.output
    assert not list(out.glob("checkpoint-*")) and not (out / "iter_0").exists()
