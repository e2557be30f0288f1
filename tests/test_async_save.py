"""`--async_save` in process: the snapshot and the background writer give HF's own checkpoint files
byte for byte (checked against HF's save of the same step), the checksums computed while writing are
the files' checksums, a plain HF Trainer resumes from an async checkpoint, errors and abandon behave.
(The kill-anywhere runs with --async_save are in test_resilience.py; the GPU path in
test_async_save_gpu.py.)"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
import torch
import xxhash

from itertrain.artifacts.async_save import MID_WEIGHTS, AsyncSaver, BackgroundWriter, write_snapshot
from itertrain.artifacts.hashed_io import Cancel, HashingFile, safetensors_header, torch_save_hashed, write_tensor
from itertrain.artifacts.manifest import FileEntry, build_manifest
from itertrain.artifacts.snapshot import BytesFile, HostBufferPool, Snapshot, TorchFile, WeightsFile, copy_tree
from itertrain.errors import ArtifactWriteError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(path: Path) -> FileEntry:
    data = path.read_bytes()
    return FileEntry(len(data), xxhash.xxh3_128_hexdigest(data))


def _adamw_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    decay = [p for n, p in model.named_parameters() if "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    for _ in range(2):
        model(torch.randn(3, 32)).sum().backward()
        opt.step()
    return opt, model


def test_our_safetensors_layout_is_the_librarys_byte_for_byte(tmp_path):
    from safetensors.torch import save_file

    tensors = {"z.weight": torch.randn(7, 5), "a.bias": torch.randn(5).to(torch.bfloat16),
               "m.half": torch.randn(3, 3).half(), "count": torch.tensor(7), "flag": torch.tensor([True, False]),
               "u8": torch.arange(9, dtype=torch.uint8), "d64": torch.randn(2, dtype=torch.float64),
               "i32": torch.arange(4, dtype=torch.int32), "empty": torch.zeros(0, 3), "i8": torch.arange(3, dtype=torch.int8),
               "i16": torch.arange(3, dtype=torch.int16), "f8": torch.randn(4).to(torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    header, order = safetensors_header(tensors, {"format": "pt"})
    f = HashingFile(tmp_path / "ours.safetensors")
    f.write(header)
    for name in order:
        write_tensor(f, tensors[name].contiguous())
    entry = f.close(fsync=False)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert entry == _entry(tmp_path / "ours.safetensors")
    with pytest.raises(ValueError, match="random"):
        safetensors_header(tensors, {"format": "pt", "other": "x"})


def test_torch_save_hashed_is_torch_save_byte_for_byte_even_with_a_large_pickle(tmp_path):
    """The optimizer goes through a pump process: torch writes data.pkl and the zip's end holding the
    GIL, so a pickle larger than the pipe must not stall (a pump thread would deadlock here)."""
    opt, _ = _adamw_state()
    big_pickle = {"blob": bytes(range(256)) * 12000, "t": torch.arange(3.0)}  # data.pkl ~3 MiB, pipe 1 MiB
    for name, obj in (("optimizer.pt", opt.state_dict()), ("big.pt", big_pickle)):
        (tmp_path / "ref").mkdir(exist_ok=True)
        torch.save(obj, tmp_path / "ref" / name)
        entry = torch_save_hashed(obj, str(tmp_path / name), fsync=True)
        assert (tmp_path / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
        assert entry == _entry(tmp_path / name)
    assert (tmp_path / "ref" / "big.pt").stat().st_size > 2 << 20


def test_copy_tree_keeps_views_and_sharing_and_does_not_move_with_training(tmp_path):
    opt, model = _adamw_state()
    before = opt.state_dict()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(before, tmp_path / "a" / "optimizer.pt")
    tagged: list[int] = []
    copy, nbytes = copy_tree(opt.state_dict(), HostBufferPool(pin=False), "optimizer", tagged)
    assert nbytes > 0 and tagged == []
    assert copy["param_groups"][0]["betas"] is copy["param_groups"][1]["betas"]  # pickle memoizes it once
    model(torch.randn(3, 32)).sum().backward()
    opt.step()  # training moves on: the copy must not
    torch.save(copy, tmp_path / "b" / "optimizer.pt")  # the same name: torch.save puts it in the zip
    assert _sha(tmp_path / "a" / "optimizer.pt") == _sha(tmp_path / "b" / "optimizer.pt")
    base = torch.arange(10.0)
    view_copy, _ = copy_tree({"v": base[2:5], "w": base}, HostBufferPool(pin=False), "v", [])
    assert view_copy["v"].untyped_storage().data_ptr() == view_copy["w"].untyped_storage().data_ptr()
    assert view_copy["v"].storage_offset() == 2 and view_copy["v"].tolist() == [2.0, 3.0, 4.0]


def test_host_buffers_are_reused_across_saves_no_growth():
    pool = HostBufferPool(pin=False)
    state = {"a": torch.randn(100), "b": torch.randn(7, 3)}
    copy_tree(state, pool, "x", [])
    first = pool.nbytes
    ptrs = [pool.storage(f"x/{i}", n).data_ptr() for i, n in enumerate((400, 84))]
    for _ in range(3):
        copy_tree(state, pool, "x", [])
    assert pool.nbytes == first == 484
    assert ptrs == [pool.storage(f"x/{i}", n).data_ptr() for i, n in enumerate((400, 84))]
    pool.release()
    assert pool.nbytes == 0


def _snapshot(directory: Path, mib: int = 64) -> Snapshot:
    tensors = {f"w{i}": torch.randn(mib << 16) for i in range(4)}  # 4 x mib/4... MiB of fp32
    header, order = safetensors_header(tensors, {"format": "pt"})
    opt, _ = _adamw_state()
    return Snapshot(3, directory, 0, 1, [BytesFile("config.json", b"{}\n"),
                                          WeightsFile("model.safetensors", header, [tensors[n] for n in order]),
                                          TorchFile("optimizer.pt", opt.state_dict())])


def test_write_snapshot_digests_are_the_files_and_the_manifest_needs_no_read_back(tmp_path):
    snap = _snapshot(tmp_path / "checkpoint-3", mib=1)
    digests = write_snapshot(snap, fsync=True)
    assert digests == {rel: _entry(tmp_path / "checkpoint-3" / rel) for rel in digests}
    manifest = build_manifest(tmp_path / "checkpoint-3", kind="trainer_checkpoint", iteration=0, step=3, written=digests)
    assert manifest.files == digests
    (tmp_path / "checkpoint-3" / "stray.txt").write_text("not written by the writer")
    with pytest.raises(ArtifactWriteError, match="stray.txt"):
        build_manifest(tmp_path / "checkpoint-3", kind="trainer_checkpoint", iteration=0, step=3, written=digests)


def test_writer_errors_surface_on_wait_and_abandon_stops_mid_file(tmp_path, monkeypatch):
    writer = BackgroundWriter()
    (tmp_path / "blocked").write_text("a file where the checkpoint directory should be")
    writer.start("t", lambda cancel: write_snapshot(_snapshot(tmp_path / "blocked", 1), fsync=False, cancel=cancel))
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # the error was reported once
    monkeypatch.setenv("ITERTRAIN_FAULT", f"{MID_WEIGHTS}=sleep:3")
    done: list[str] = []
    writer.start("t", lambda cancel: (write_snapshot(_snapshot(tmp_path / "c", 64), fsync=False, cancel=cancel),
                                      done.append("finished")))
    while not (tmp_path / "c" / "model.safetensors").exists():
        time.sleep(0.01)
    assert writer.busy
    assert writer.abandon() is True  # returns once the write stopped at its next chunk
    assert not writer.busy and done == []
    size = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert size < 64 << 20 and not (tmp_path / "c" / "optimizer.pt").exists()  # stopped before the end (64 MiB)
    writer.wait()  # an abandoned write raises nothing


def test_cancel_runs_its_actions_once():
    cancel, calls = Cancel(), []
    cancel.on_set(lambda: calls.append(1))
    removed = lambda: calls.append(2)  # noqa: E731
    cancel.on_set(removed)
    cancel.discard(removed)
    cancel.set()
    cancel.set()
    cancel.on_set(lambda: calls.append(3))  # already set: runs at once
    assert calls == [1, 3] and cancel.is_set()


# ---- with HF Trainer ------------------------------------------------------------------------------
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
                             seed=42, warmup_steps=2)
    return (cls or Trainer)(model=model, args=args, train_dataset=build_dataset(rows, tok, 64),
                            data_collator=PadCollator(tok.pad_token_id), processing_class=tok, callbacks=[ConsumeRng()])


def _async_trainer_class(saver: AsyncSaver, written: dict):
    from transformers import Trainer

    class AsyncTrainer(Trainer):
        def _save_checkpoint(self, model, trial):
            step = self.state.global_step
            saver.save(self, trial, lambda digests, best: written.setdefault(step, digests))

        def _finalize_training(self, *args, **kwargs):
            saver.wait()
            return super()._finalize_training(*args, **kwargs)

    return AsyncTrainer


@pytest.mark.slow  # trains three times (in process)
def test_async_checkpoints_are_hfs_own_files_and_plain_hf_resumes_from_them(tmp_path, tiny_model, train_file,
                                                                            monkeypatch):
    from transformers import Trainer

    run = tmp_path / "run"  # the same output_dir for both: training_args.bin pickles it
    _trainer(tiny_model, train_file, run).train()
    run.rename(tmp_path / "hf")
    saver, written = AsyncSaver(fsync=False), {}
    # Hold the first write mid-file: training moves on (and consumes RNG) while checkpoint-3 is written.
    monkeypatch.setenv("ITERTRAIN_FAULT", f"{MID_WEIGHTS}=sleep:2#1")
    _trainer(tiny_model, train_file, run, _async_trainer_class(saver, written)).train()
    run.rename(tmp_path / "async")
    assert sorted(written) == [3, 6, 7]
    for step in written:
        hf, ours = tmp_path / "hf" / f"checkpoint-{step}", tmp_path / "async" / f"checkpoint-{step}"
        names = sorted(p.name for p in hf.iterdir())
        assert names == sorted(p.name for p in ours.iterdir()) == sorted(written[step])
        assert {n: _sha(hf / n) for n in names} == {n: _sha(ours / n) for n in names}, step
        assert written[step] == {n: _entry(ours / n) for n in names}  # hashed while written = the bytes
    # A plain HF Trainer resumes from an async checkpoint and ends where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "async" / "checkpoint-3", resumed / "checkpoint-3")
    monkeypatch.delenv("ITERTRAIN_FAULT")
    t = _trainer(tiny_model, train_file, resumed, Trainer)
    t.train(resume_from_checkpoint=str(resumed / "checkpoint-3"))
    assert _sha(resumed / "checkpoint-7" / "model.safetensors") == _sha(tmp_path / "hf" / "checkpoint-7" / "model.safetensors")
    assert _sha(resumed / "checkpoint-7" / "optimizer.pt") == _sha(tmp_path / "hf" / "checkpoint-7" / "optimizer.pt")


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


def test_the_hf_code_the_async_path_mirrors_is_checked_before_launch():
    """On the pinned transformers the async path's copy of HF's save code is current; on any other
    (the lower-bound check runs 4.56) --async_save is either current there too or refused by name."""
    import transformers

    from itertrain.artifacts.snapshot import MIRRORED, launch_refusal, mirrored_fingerprints

    refusal = launch_refusal(use_peft=False, sharded=None, push_to_hub=False)
    if transformers.__version__ == "5.24.0":  # constraints.txt
        assert mirrored_fingerprints() == MIRRORED, "transformers changed code that --async_save repeats: re-check it"
        assert refusal is None
    elif mirrored_fingerprints() != MIRRORED:
        assert refusal is not None and f"transformers {transformers.__version__} differs in" in refusal
    for kwargs, flag in ((dict(use_peft=True, sharded=None, push_to_hub=False), "--use_peft"),
                         (dict(use_peft=False, sharded="--fsdp", push_to_hub=False), "--fsdp"),
                         (dict(use_peft=False, sharded=None, push_to_hub=True), "--push_to_hub")):
        refusal = launch_refusal(**kwargs)
        assert refusal is not None and refusal.startswith(f"--async_save with {flag}")


def test_async_save_with_lora_is_refused_at_parse_time_naming_both_flags(tmp_path):
    """exit 2 before anything is written; without --use_peft the flag parses (and the record treats it as
    how checkpoints are written, not what the experiment is)."""
    from itertrain.artifacts.snapshot import launch_refusal
    from itertrain.errors import UsageError
    from itertrain.experiment import _QUIET
    from itertrain.parser import parse_train_args

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["--model_name", str(model), "--output_dir", str(tmp_path / "out"), "--train_file", str(data), "--async_save"]
    if launch_refusal(use_peft=False, sharded=None, push_to_hub=False) is None:  # else: another transformers
        assert parse_train_args(argv).loop.async_save is True
    assert "async_save" in _QUIET
    with pytest.raises(UsageError, match=r"--async_save with --use_peft: .*drop --async_save") as e:
        parse_train_args([*argv, "--use_peft"])
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_async_save_refuses_a_trainer_class_with_its_own_save_steps():
    """TRL's DPOTrainer writes a model card in its _save_checkpoint: --async_save would skip it (exit 2)."""
    from transformers import Trainer

    from itertrain.errors import UsageError
    from itertrain.trainer import check_async_save, with_recovery_hooks

    class CardTrainer(Trainer):
        def _save_checkpoint(self, model, trial):
            return super()._save_checkpoint(model, trial)

    check_async_save(with_recovery_hooks(Trainer))
    with pytest.raises(UsageError, match="--async_save with CardTrainer: it overrides Trainer._save_checkpoint") as e:
        check_async_save(with_recovery_hooks(CardTrainer))
    assert e.value.exit_code == 2
