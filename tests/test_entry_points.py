"""pip users' command lines: `torchrun --no-python itertrain train ...` from any directory, and a requeue
script that runs the same command every time (ITERTRAIN_RESUME=auto)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import PY, _run, base_env, free_port, weights
from itertrain.errors import UsageError


def test_itertrain_resume_auto_makes_auto_the_default_and_an_explicit_flag_still_wins(tmp_path, monkeypatch):
    from itertrain.parser import parse_train_args

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["--model_name", str(model), "--output_dir", str(tmp_path / "out"), "--train_file", str(data)]
    assert (parse_train_args(argv).recovery.resume_from, parse_train_args(argv).recovery.resume_from_iteration) == (
        "none", "none")
    monkeypatch.setenv("ITERTRAIN_RESUME", "auto")
    cfg = parse_train_args(argv)
    assert (cfg.recovery.resume_from, cfg.recovery.resume_from_iteration) == ("auto", "auto")
    assert parse_train_args([*argv, "--resume_from", "none"]).recovery.resume_from == "none"
    over = parse_train_args([*argv, "--overwrite_output_dir"]).recovery  # starting over is not turned into a resume
    assert (over.resume_from, over.resume_from_iteration) == ("none", "none")
    monkeypatch.setenv("ITERTRAIN_RESUME", "yes")
    with pytest.raises(UsageError, match="ITERTRAIN_RESUME='yes' is not valid: set it to auto") as e:
        parse_train_args(argv)
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_no_python_itertrain_from_outside_the_repo_requeued_with_the_same_command(
        tmp_path, tiny_model, train_file, sft_args):
    """2 ranks, started as `torchrun --no-python itertrain train ...` in a directory outside the repository;
    the first launch is killed as iteration 1 starts training, the same command finishes the experiment."""
    out, elsewhere = tmp_path / "exp", tmp_path / "jobdir"
    elsewhere.mkdir()
    env = {"ITERTRAIN_RESUME": "auto", "PATH": os.pathsep.join([str(Path(PY).parent), os.environ.get("PATH", "")])}

    def launch(**extra: str):
        cmd = [PY, "-m", "torch.distributed.run", "--no-python", "--nproc_per_node=2", f"--master_port={free_port()}",
               "itertrain", "train", *sft_args(out)]
        return _run(cmd, base_env({**env, **extra}), 600, elsewhere)

    first = launch(ITERTRAIN_FAULT="stage.train=kill#2")
    assert first.returncode != 0 and (out / "iter_0").is_dir() and not (out / "iter_1").exists(), first.output
    iter_0 = (out / "iter_0" / "model.safetensors").read_bytes()
    again = launch()
    assert again.returncode == 0, again.output
    assert (out / "iter_0" / "model.safetensors").read_bytes() == iter_0  # continued, not started over
    assert set(weights(out / "iter_1")) and not list(elsewhere.iterdir())  # nothing written where it was started


@pytest.mark.slow
def test_a_requeue_command_under_itertrain_resume_auto_that_overwrites_warns_that_every_requeue_will(tmp_path,
                                                                                                     sft_args):
    from conftest import itertrain

    out = tmp_path / "exp"
    assert itertrain("train", *sft_args(out, iterations=1)).returncode == 0
    r = itertrain("train", *sft_args(out, "--overwrite_output_dir", iterations=1), env={"ITERTRAIN_RESUME": "auto"})
    assert r.returncode == 0, r.output
    assert "ITERTRAIN_RESUME=auto is set, yet this command's --overwrite_output_dir moved committed work to " \
           "superseded/: a requeue that repeats this command does so again every time" in r.stdout, r.output
    assert len(list((out / "superseded").iterdir())) == 1


def test_cli_run_from_python_gives_back_the_callers_signal_handlers_and_leaves_no_watcher_thread(tmp_path):
    import signal
    import threading

    from itertrain import cli

    def callers_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, callers_handler)
    usr1_before = signal.signal(signal.SIGUSR1, callers_handler)
    try:
        code = cli.run(["--model_name", str(tmp_path / "no-model"), "--train_file", str(tmp_path / "t.jsonl"),
                        "--output_dir", str(tmp_path / "out")])
        assert code == 2  # the missing model is refused after itertrain installed its handlers
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        assert signal.getsignal(signal.SIGUSR1) is callers_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        for t in threading.enumerate():
            if t.name == "itertrain-signal-watch":
                t.join(10)
                assert not t.is_alive()
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGUSR1, usr1_before)


def test_cli_main_then_run_in_one_process_restores_the_callers_handler_and_ends_every_watcher(tmp_path):
    import signal
    import threading

    from itertrain import cli

    def callers_handler(signum, frame):
        pass

    args = ["--model_name", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out")]
    before = signal.getsignal(signal.SIGUSR1)
    try:
        assert cli.main(["train", *args]) == 2  # `main` is a process's entry: its handlers stay installed
        signal.signal(signal.SIGUSR1, callers_handler)  # the program then sets its own, and calls `run`
        assert cli.run(args) == 2
        assert signal.getsignal(signal.SIGUSR1) is callers_handler
        watchers = [t for t in threading.enumerate() if t.name == "itertrain-signal-watch"]
        for t in watchers:
            t.join(10)
        assert not any(t.is_alive() for t in watchers)
    finally:
        signal.signal(signal.SIGUSR1, before)
