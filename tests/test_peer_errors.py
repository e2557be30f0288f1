"""A user's error under torchrun is the user's error: one line, its exit code, never "lost contact",
and not repeated by torchrun's restarts; a SIGKILLed peer is a lost peer, not a preemption."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from conftest import FAST_FLAGS, PY, _run, base_env, free_port
from jobs import Job, torchrun_cmd

from itertrain.layout import MANIFEST_NAME

pytestmark = pytest.mark.slow  # real processes: torchrun, training

EOF_COLLATOR = textwrap.dedent("""
    import os
    from itertrain import Strategy
    from itertrain.data import PadCollator

    class Decoder(PadCollator):
        calls = 0

        def __call__(self, batch):
            type(self).calls += 1
            if os.environ.get("RANK") == "1" and type(self).calls == 2:
                raise RuntimeError("unexpected EOF while decoding sample 17")
            return super().__call__(batch)

    class EofStrategy(Strategy):
        def train_rows(self, iteration):
            return [{"prompt": f"{a}+{iteration}=", "completion": str(a + iteration)} for a in range(40)]

        def data_collator(self):
            return Decoder(self.ctx.tokenizer.pad_token_id)
""")


def torchrun_with(launcher_flags: list[str], args: list[str], cwd, nproc: int = 2) -> tuple[int, str]:
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *launcher_flags, "-m", "itertrain", "train", *args]
    r = _run(cmd, base_env(), 600, cwd)
    return r.returncode, r.output


def run_plugin(tmp_path: Path, tiny_model: Path, strategy: str, source: str, *args: str,
               launcher: tuple[str, ...] = (), nproc: int = 2) -> tuple[int, str, Path]:
    """One iteration of `--strategy module:Class` under torchrun, in a project folder holding the strategy's
    source as module.py, into tmp_path/exp: the exit code, the output and the output dir."""
    work = tmp_path / "project"
    work.mkdir()
    (work / f"{strategy.partition(':')[0]}.py").write_text(source)
    out = tmp_path / "exp"
    rc, output = torchrun_with(list(launcher), ["--model_name", str(tiny_model), "--output_dir", str(out), *args,
                                                "--strategy", strategy, "--num_iterations", "1", *FAST_FLAGS],
                               work, nproc)
    return rc, output, out


def test_a_user_runtime_error_saying_eof_is_the_users_one_line_and_torchrun_does_not_repeat_it(tmp_path,
                                                                                               tiny_model):
    rc, output, _ = run_plugin(tmp_path, tiny_model, "eofmod:EofStrategy", EOF_COLLATOR, launcher=("--max-restarts=2",))
    assert rc == 1, output
    line = "RuntimeError: unexpected EOF while decoding sample 17"
    assert f"itertrain: error: training of iteration 0 failed: {line} (on rank 1)" in output, output
    assert "lost contact" not in output and "preempted" not in output, output
    # the restarts torchrun makes stop at once with the same line instead of training again
    assert output.count("stage: train") == 1, output
    assert "not retried" in output, output


def test_a_sigkilled_peer_under_max_restarts_is_a_lost_peer_not_a_preemption_and_the_restart_finishes(
        tmp_path, tiny_model, train_file):
    out = tmp_path / "exp"
    cmd = torchrun_cmd(["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                        "--num_iterations", "1", *FAST_FLAGS], port=free_port(), extra=["--max-restarts=1"])
    # every rank holds the set-up of training open for a moment (the restart too)
    with Job(cmd, base_env({"ITERTRAIN_FAULT": "stage.train=sleep:6"}), log=tmp_path / "job.log") as job:
        job.wait_for("stage: train", 1, timeout=600)
        job.signal_rank(1, signal.SIGKILL)
        rc = job.wait(900)
        output = job.output
    assert rc == 0, output[-4000:]
    assert "itertrain: error: rank 0 lost contact with another rank while the set-up of training (iteration 0): " \
           "a rank of this node exited" in output, output[-4000:]
    assert "preempted" not in output, output[-4000:]
    assert "torchrun restart 1 of 1: continuing this launch" in output
    assert (out / "iter_0" / "model.safetensors").exists()


RAISING_ROWS = textwrap.dedent("""
    from itertrain import Strategy

    class Broken(Strategy):
        def train_rows(self, iteration):
            raise KeyError("prompt_column")
""")


def test_a_plugin_whose_train_rows_raise_gives_one_line_and_exit_2_before_anything_is_written(tmp_path, tiny_model):
    rc, output, out = run_plugin(tmp_path, tiny_model, "brokenmod:Broken", RAISING_ROWS)
    assert "itertrain: error: Broken.train_rows(0) raised KeyError: 'prompt_column'. Nothing was written" in output, \
        output
    assert output.count("itertrain: error:") == 1 and "brokenmod.py" not in output, output  # no traceback
    assert rc == 1  # torchrun's own code for a failed worker; the worker's is 2:
    assert "exitcode  : 2" in output, output
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


SAVE_FAILS_ON_RANK_1 = textwrap.dedent("""
    import os
    from transformers import Trainer
    from itertrain.strategies.sft import SFTStrategy

    class RankOneSaveFails(Trainer):
        def _save_rng_state(self, output_dir):
            if os.environ.get("RANK") == "1" and self.state.global_step == 4:
                raise RuntimeError("user bug in rank-1 save")
            return super()._save_rng_state(output_dir)

    class BadSave(SFTStrategy):
        def trainer_class_for(self, k):
            return RankOneSaveFails
""")


def test_a_rank_that_fails_while_saving_leaves_the_checkpoint_uncommitted_and_its_error_is_reported(
        tmp_path, tiny_model, train_file):
    rc, output, out = run_plugin(tmp_path, tiny_model, "badsave:BadSave", SAVE_FAILS_ON_RANK_1,
                                 "--train_file", str(train_file))
    assert rc == 1, output
    assert "failed: RuntimeError: user bug in rank-1 save (on rank 1)" in output, output
    assert "lost contact" not in output, output
    # rank 1's files of checkpoint-4 never reached the disk: no manifest may say the checkpoint is whole
    assert not (out / "checkpoint-4" / MANIFEST_NAME).exists(), sorted(p.name for p in (out / "checkpoint-4").iterdir())


ERROR_AFTER_BACKWARD_ON_RANK_1 = textwrap.dedent("""
    import os
    from transformers import Trainer
    from itertrain.strategies.sft import SFTStrategy

    class RankOneAfterBackward(Trainer):
        def training_step(self, model, inputs, *a, **k):
            loss = super().training_step(model, inputs, *a, **k)
            if os.environ.get("RANK") == "1" and self.state.global_step == 5:
                raise ValueError("user bug after backward on rank 1")
            return loss

    class PostBwd(SFTStrategy):
        def trainer_class_for(self, k):
            return RankOneAfterBackward
""")


def test_a_users_error_on_rank_1_while_rank_0_checks_for_preemption_is_reported_as_that_error_not_retried(
        tmp_path, tiny_model, train_file):
    rc, output, _ = run_plugin(tmp_path, tiny_model, "postbwd:PostBwd", ERROR_AFTER_BACKWARD_ON_RANK_1,
                               "--train_file", str(train_file), launcher=("--max-restarts=1",))
    assert rc == 1, output
    assert "itertrain: error: training of iteration 0 failed: ValueError: user bug after backward on rank 1 " \
           "(on rank 1)" in output, output
    assert "lost contact" not in output, output
    assert output.count("stage: train") == 1 and "not retried" in output, output  # the restart does not train


FAILING_METRIC = textwrap.dedent("""
    from itertrain.strategies.sft import SFTStrategy

    class BadMetric(SFTStrategy):
        def task_metrics(self, k, model):
            raise KeyError("accuracy")
""")


def test_a_plugin_whose_task_metrics_raise_gives_one_line_naming_the_method_and_torchrun_does_not_repeat_it(
        tmp_path, tiny_model, train_file):
    rc, output, out = run_plugin(tmp_path, tiny_model, "badmetric:BadMetric", FAILING_METRIC,
                                 "--train_file", str(train_file), launcher=("--max-restarts=1",))
    assert rc == 1, output
    assert "itertrain: error: BadMetric.task_metrics(0) raised KeyError: 'accuracy'. Iteration 0 trained" in output, \
        output
    assert "badmetric.py" not in output and 'raise KeyError("accuracy")' not in output, output  # no traceback
    assert output.count("stage: train") == 1 and "not retried" in output, output
    assert (out / "checkpoint-12" / MANIFEST_NAME).exists() and not (out / "iter_0").exists()


LONG_USAGE_ERROR = textwrap.dedent("""
    from itertrain import Strategy

    class Broken(Strategy):
        def train_rows(self, iteration):
            raise KeyError("prompt_column " + "x" * 290)
""")


def test_one_worker_under_torchrun_is_not_restarted_on_a_usage_error_and_the_repeated_line_keeps_its_remedy(
        tmp_path, tiny_model):
    _, output, _ = run_plugin(tmp_path, tiny_model, "brokenmod:Broken", LONG_USAGE_ERROR, launcher=("--max-restarts=1",),
                              nproc=1)
    # the restart stops at once with the whole line (remedy included), and torchrun's restarts end there
    assert "relaunch the same command (attempt 0 of this torchrun launch ended on it; not retried" in output, output
    assert output.count("raised KeyError") == 2, output
