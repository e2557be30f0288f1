"""`--async_save`: HF's own save code writes every file, from host copies taken at the save step, so
the checkpoints are HF's byte for byte (checked against HF's save of the same step, TRL's DPOTrainer in
test_iterative_dpo.py); a plain HF Trainer resumes from them; errors and abandon behave; a SIGTERM to
torchrun while a write is in flight commits that write and then the preemption checkpoint.
(The kill-anywhere runs with --async_save are in test_resilience.py; the GPU path in
test_async_save_gpu.py.)"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, manifest, torchrun
from itertrain.artifacts.async_save import (
    OPTIMIZER_WRITE,
    WEIGHTS_WRITTEN,
    Abandoned,
    AsyncSaver,
    BackgroundWriter,
    Capture,
)
from itertrain.errors import ArtifactWriteError
from itertrain.artifacts.snapshot import HostBufferPool, copy_tree, located_as
from jobs import Job, torchrun_cmd


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adamw_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    decay = [p for n, p in model.named_parameters() if "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    for _ in range(2):
        model(torch.randn(3, 32)).sum().backward()
        opt.step()
    return opt, model


def test_copy_tree_keeps_views_and_sharing_and_does_not_move_with_training(tmp_path):
    opt, model = _adamw_state()
    before = opt.state_dict()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(before, tmp_path / "a" / "optimizer.pt")
    tags: dict[int, str] = {}
    copy, nbytes = copy_tree(opt.state_dict(), HostBufferPool(pin=False), "optimizer", tags)
    assert nbytes > 0 and tags == {}
    assert copy["param_groups"][0]["betas"] is copy["param_groups"][1]["betas"]  # pickle memoizes it once
    model(torch.randn(3, 32)).sum().backward()
    opt.step()  # training moves on: the copy must not
    torch.save(copy, tmp_path / "b" / "optimizer.pt")  # the same name: torch.save puts it in the zip
    assert _sha(tmp_path / "a" / "optimizer.pt") == _sha(tmp_path / "b" / "optimizer.pt")
    base = torch.arange(10.0)
    view_copy, _ = copy_tree({"v": base[2:5], "w": base}, HostBufferPool(pin=False), "v", {})
    assert view_copy["v"].untyped_storage().data_ptr() == view_copy["w"].untyped_storage().data_ptr()
    assert view_copy["v"].storage_offset() == 2 and view_copy["v"].tolist() == [2.0, 3.0, 4.0]


def test_host_buffers_are_reused_across_saves_no_growth():
    pool = HostBufferPool(pin=False)
    state = {"a": torch.randn(100), "b": torch.randn(7, 3)}
    copy_tree(state, pool, "x", {})
    first = pool.nbytes
    ptrs = [pool.storage(f"x/{i}", n).data_ptr() for i, n in enumerate((400, 84))]
    for _ in range(3):
        copy_tree(state, pool, "x", {})
    assert pool.nbytes == first == 484
    assert ptrs == [pool.storage(f"x/{i}", n).data_ptr() for i, n in enumerate((400, 84))]
    pool.release()
    assert pool.nbytes == 0


def test_save_pretrained_from_the_host_copy_writes_hfs_bytes_with_tied_weights(tmp_path):
    """What the writer does with the weights: HF's save_pretrained given the copied state dict; tied
    embeddings stay one storage in the copy, so HF drops the tied key as it does from the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, tie_word_embeddings=True))
    host, _ = copy_tree(model.state_dict(), HostBufferPool(pin=False), "weights", {})
    assert host["lm_head.weight"].untyped_storage().data_ptr() == host["model.embed_tokens.weight"].untyped_storage().data_ptr()
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moves on: the copy must not
    model.save_pretrained(tmp_path / "copy", state_dict=host)
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert {n: _sha(tmp_path / "hf" / n) for n in names} == {n: _sha(tmp_path / "copy" / n) for n in names}


def test_located_as_records_the_originals_device_only_inside_the_write_and_removes_its_tagger(tmp_path):
    """On CUDA an optimizer copy in host memory must be written as HF writes the original ("cuda:0");
    the tagger that does it exists only for that write, even when the write fails."""
    import pickletools
    import zipfile

    def locations(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        return {arg for op, arg, _ in pickletools.genops(pkl) if op.name.endswith("UNICODE") and
                isinstance(arg, str) and arg.startswith(("cpu", "cuda"))}

    t = torch.arange(4.0)
    registry = torch.serialization._package_registry
    before = list(registry)
    with located_as({t.untyped_storage().data_ptr(): "cuda:0"}):
        torch.save({"t": t}, tmp_path / "in.pt")
    torch.save({"t": t}, tmp_path / "after.pt")
    assert locations(tmp_path / "in.pt") == {"cuda:0"} and locations(tmp_path / "after.pt") == {"cpu"}
    with pytest.raises(RuntimeError, match="does not exist"):
        with located_as({t.untyped_storage().data_ptr(): "cuda:0"}):
            torch.save({"t": t}, tmp_path / "no-such-dir" / "x.pt")
    assert registry == before


def test_writer_errors_surface_on_wait_and_abandon_stops_before_the_next_file(tmp_path):
    writer = BackgroundWriter()

    def fail(cancel):
        raise OSError(28, "No space left on device")

    writer.start("t", fail)
    with pytest.raises(OSError, match="No space"):
        writer.wait()
    writer.wait()  # the error was reported once
    started, written = threading.Event(), []

    def files(cancel):
        for i in range(100):
            if cancel.is_set():
                raise Abandoned("abandoned")
            started.set()
            written.append(i)
            time.sleep(0.05)

    writer.start("t", files)
    started.wait(10)
    assert writer.busy
    assert writer.abandon() is True  # returns once the write stopped before its next file
    assert not writer.busy and 0 < len(written) < 100
    writer.wait()  # an abandoned write raises nothing

# ---- with HF Trainer ------------------------------------------------------------------------------
def _fixed_logging_dir(args_class: type, output_dir: Path) -> dict:
    """transformers < 5 stamps the launch time into the default logging_dir, which training_args.bin
    pickles: two runs' files would differ there alone."""
    return {"logging_dir": str(output_dir / "runs")} if "logging_dir" in args_class.__dataclass_fields__ else {}


def _trainer(tiny_model: Path, train_file: Path, output_dir: Path, cls=None, max_steps: int = 7):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from itertrain.data import PadCollator, build_dataset, read_jsonl

    class ConsumeRng(TrainerCallback):  # a late-rendered rng_state.pth would be caught
        def on_step_end(self, *args, **kwargs):
            import random

            import numpy as np

            random.random(), np.random.rand(), torch.rand(2)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_jsonl(str(train_file))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=2,
                             seed=42, warmup_steps=2, **_fixed_logging_dir(TrainingArguments, output_dir))
    return (cls or Trainer)(model=model, args=args, train_dataset=build_dataset(rows, tok, 64),
                            data_collator=PadCollator(tok.pad_token_id), processing_class=tok, callbacks=[ConsumeRng()])


def _hooked_trainer(tiny_model: Path, train_file: Path, output_dir: Path):
    """The trainer as itertrain runs it with --async_save: RecoveryHooks and a CheckpointManager."""
    from transformers import Trainer

    from itertrain.artifacts.manager import CheckpointConfig, CheckpointManager
    from itertrain.trainer import attach, with_recovery_hooks

    manager = CheckpointManager(CheckpointConfig(output_dir=output_dir, async_save=True, fsync=False))
    manager.start_iteration(0, {})
    return attach(_trainer(tiny_model, train_file, output_dir, with_recovery_hooks(Trainer)), manager)


def test_a_full_disk_on_rank_1_reads_on_rank_0_as_the_sentence_rank_1_prints(tmp_path):
    directory = tmp_path / "checkpoint-4"
    directory.mkdir()

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    rank1 = AsyncSaver(timeout=30)
    rank1.start(Capture(4, directory, 1, 2, writes=[("weights", full_disk)]), lambda best: None, None)
    with pytest.raises(ArtifactWriteError) as on_rank1:
        rank1.writer.wait()
    rank0 = AsyncSaver(timeout=30)
    rank0.start(Capture(4, directory, 0, 2), lambda best: None, None)
    with pytest.raises(ArtifactWriteError) as on_rank0:
        rank0.writer.wait()
    assert "the disk is full (ENOSPC)" in str(on_rank1.value)
    assert str(on_rank0.value) == f"rank 1: {on_rank1.value}"


@pytest.mark.slow  # trains three times (in process)
def test_async_checkpoints_are_hfs_own_files_and_plain_hf_resumes_from_them(tmp_path, tiny_model, train_file,
                                                                            monkeypatch):
    from transformers import Trainer

    run = tmp_path / "run"  # the same output_dir for both: training_args.bin pickles it
    _trainer(tiny_model, train_file, run).train()
    run.rename(tmp_path / "hf")
    # Hold the first write after its weights: training moves on (and consumes RNG) while checkpoint-3 is written.
    monkeypatch.setenv("ITERTRAIN_FAULT", f"{WEIGHTS_WRITTEN}=sleep:2#1")
    _hooked_trainer(tiny_model, train_file, run).train()
    run.rename(tmp_path / "async")
    for step in (3, 6, 7):
        hf, ours = tmp_path / "hf" / f"checkpoint-{step}", tmp_path / "async" / f"checkpoint-{step}"
        names = sorted(p.name for p in hf.iterdir())
        assert sorted(manifest(ours)["files"]) == names  # committed, with exactly HF's files
        assert {n: _sha(hf / n) for n in names} == {n: _sha(ours / n) for n in names}, step
    # A plain HF Trainer resumes from an async checkpoint and ends where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "async" / "checkpoint-3", resumed / "checkpoint-3")
    monkeypatch.delenv("ITERTRAIN_FAULT")
    t = _trainer(tiny_model, train_file, resumed, Trainer)
    t.train(resume_from_checkpoint=str(resumed / "checkpoint-3"))
    for name in ("model.safetensors", "optimizer.pt"):
        assert _sha(resumed / "checkpoint-7" / name) == _sha(tmp_path / "hf" / "checkpoint-7" / name)


def test_an_unsupported_setup_is_named():
    from types import SimpleNamespace

    from itertrain.artifacts.snapshot import unsupported_reason

    args = SimpleNamespace(push_to_hub=False)
    base = dict(args=args, hp_search_backend=None, is_deepspeed_enabled=False, is_fsdp_enabled=False,
                model=torch.nn.Linear(2, 2))
    assert unsupported_reason(SimpleNamespace(**{**base, "is_deepspeed_enabled": True})) == "DeepSpeed"
    assert unsupported_reason(SimpleNamespace(**{**base, "is_fsdp_enabled": True})) == "FSDP"
    assert "not a PreTrainedModel" in unsupported_reason(SimpleNamespace(**base))
    assert "push_to_hub" in unsupported_reason(SimpleNamespace(**{**base, "args": SimpleNamespace(push_to_hub=True)}))


def test_async_save_with_lora_sharding_or_hub_is_refused_at_parse_time_naming_both_flags(tmp_path):
    """exit 2 before anything is written; without them the flag parses on any transformers (and the record
    treats it as how checkpoints are written, not what the experiment is)."""
    from itertrain.errors import UsageError
    from itertrain.experiment import _QUIET
    from itertrain.parser import parse_train_args

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["--model_name", str(model), "--output_dir", str(tmp_path / "out"), "--train_file", str(data), "--async_save"]
    assert parse_train_args(argv).loop.async_save is True
    assert "async_save" in _QUIET
    for extra, flag in ((["--use_peft"], "--use_peft"), (["--push_to_hub", "true"], "--push_to_hub")):
        with pytest.raises(UsageError, match=rf"--async_save with {flag}: .*drop") as e:
            parse_train_args([*argv, *extra])
        assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


# ---- a stop signal while a write is in flight (torchrun, 2 ranks) ----------------------------------------
LOSS = r"\{'loss': "
PREEMPTED_LINE = re.compile(r"^itertrain: preempted: SIGTERM: stopped at step \d+ \(checkpoint-\d+ of iteration 0 "
                            r"committed\).*\(exit 143\)$", re.M)
TESTS = str(Path(__file__).resolve().parent)
WORKER_TRACEBACK = re.compile(r'File "[^"]*/(itertrain|transformers)/')  # torchrun's own traceback is not ours


def _preempt_args(out: Path, tiny_model: Path, train_file: Path) -> list[str]:
    return ["--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
            "--strategy", "slow_steps:SlowSteps", "--num_iterations", "1", "--max_steps", "16", "--save_steps", "2",
            "--logging_steps", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--disable_tqdm", "true", "--report_to", "none", "--async_save"]


def _env(**extra: str) -> dict[str, str]:
    from conftest import base_env

    return base_env({"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **extra})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, train_file) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "exp"
    r = torchrun(*_preempt_args(out, tiny_model, train_file), env=_env())
    assert r.returncode == 0, r.output
    return out


def _stop_mid_write(tmp_path: Path, tiny_model: Path, train_file: Path, every_process: bool) -> tuple[Path, int, int]:
    """Run until checkpoint-4's weights are written and its writer is held in the optimizer's write
    (where the issue's runs lost it), then SIGTERM: to torchrun
    (which stops its workers with killpg(SIGTERM)) or to every process of the job (SLURM, Kubernetes)."""
    out = tmp_path / "exp"
    fault = f"{OPTIMIZER_WRITE}=sleep:6#2"  # the second save (checkpoint-4) stays in flight for 6 s
    with Job(torchrun_cmd(_preempt_args(out, tiny_model, train_file), port=free_port()),
             _env(SLOW_STEP_S="0.3", ITERTRAIN_FAULT=fault)) as job:
        deadline = time.monotonic() + 240
        while not ((out / "checkpoint-4" / "model.safetensors").exists() and job.workers()):
            assert time.monotonic() < deadline and job.proc.poll() is None, job.output[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # the writer is held in the optimizer's write
        assert not (out / "checkpoint-4" / "itertrain.manifest.json").exists()  # the write is in flight
        if every_process:
            for pid in job.ours():
                os.kill(pid, signal.SIGTERM)
        else:
            job.signal_agent(signal.SIGTERM)
        done = job.count(LOSS)
        rc = job.wait(180)
        output = job.output
    assert not WORKER_TRACEBACK.search(output) and "could not write" not in output, output[-4000:]
    assert len(PREEMPTED_LINE.findall(output)) == 1, output[-4000:]  # one line, from rank 0
    return out, rc, done


@pytest.mark.slow
def test_sigterm_to_torchrun_during_an_async_write_commits_it_then_the_preemption_checkpoint(
        tmp_path, tiny_model, train_file, uninterrupted):
    _check_stop_mid_write(tmp_path, tiny_model, train_file, uninterrupted, every_process=False)


@pytest.mark.slow
def test_sigterm_to_every_process_during_an_async_write_commits_it_then_the_preemption_checkpoint(
        tmp_path, tiny_model, train_file, uninterrupted):
    _check_stop_mid_write(tmp_path, tiny_model, train_file, uninterrupted, every_process=True)


def _check_stop_mid_write(tmp_path, tiny_model, train_file, uninterrupted, *, every_process: bool) -> None:
    out, rc, done = _stop_mid_write(tmp_path, tiny_model, train_file, every_process)
    assert rc != 0  # torchrun ends on a SignalException of its own; each worker exited 143 (the line below)
    committed = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                       if (p / "itertrain.manifest.json").exists())
    assert 4 in committed  # the write in flight was completed and committed
    stopped = max(committed)
    assert manifest(out / f"checkpoint-{stopped}")["extra"]["preemption"]["signal"] == "SIGTERM"
    assert stopped >= done  # at most the step in progress lost
    r = torchrun(*_preempt_args(out, tiny_model, train_file), "--resume_from", "auto", "--resume_from_iteration",
                 "auto", env=_env())
    assert r.returncode == 0, r.output
    assert f"Continuing at: iteration 0, step {stopped}" in r.stdout
    assert _sha(out / "iter_0" / "model.safetensors") == _sha(uninterrupted / "iter_0" / "model.safetensors")


@pytest.mark.slow
def test_one_ctrl_c_under_torchrun_during_an_async_write_commits_it_and_says_interrupted_once_without_a_traceback(
        tmp_path, tiny_model, train_file):
    """Each rank gets one Ctrl-C twice (from the terminal, then forwarded by torchrun); the copy is not
    the second Ctrl-C that would abandon the write."""
    out = tmp_path / "exp"
    fault = f"{OPTIMIZER_WRITE}=sleep:8#2@0"  # rank 0's second save (checkpoint-4) stays in flight for 8 s
    with Job(torchrun_cmd(_preempt_args(out, tiny_model, train_file), port=free_port()),
             _env(SLOW_STEP_S="0.3", ITERTRAIN_FAULT=fault)) as job:
        deadline = time.monotonic() + 240
        while not ((out / "checkpoint-4" / "model.safetensors").exists() and job.workers()):
            assert time.monotonic() < deadline and job.proc.poll() is None, job.output[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)
        assert not (out / "checkpoint-4" / "itertrain.manifest.json").exists()  # the write is in flight
        # Ctrl-C: the terminal signals every process of the group, and torchrun forwards its copy to the
        # workers. Sent in that order with a gap (a busy agent forwards late), so that the copy reaches the
        # ranks while they already wait for the write, not while the first is still pending in C code.
        for pid in job.workers().values():
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        job.signal_agent(signal.SIGINT)
        rc = job.wait(180)
        output = job.output
    assert (out / "checkpoint-4" / "itertrain.manifest.json").exists(), output[-4000:]
    assert output.count("itertrain: interrupted") == 1, output[-4000:]
    assert "abandoned" not in output, output[-4000:]
    assert not [line for line in output.splitlines() if line.startswith("[rank") and "Traceback" in line], \
        output[-4000:]
    # Each rank returns 130 through the "interrupted" line above; torchrun itself ends on its own SIGINT
    # with its SignalException (exit 1), which itertrain does not control.
    assert rc != 0, output[-4000:]
