"""`--async_save` on a GPU: the snapshot is staged in pinned host memory with asynchronous device->host
copies ordered by a CUDA event, and a checkpoint saved during bf16 training is HF's own, byte for byte,
even while training goes on updating the weights on the device during the (held) write. Skips
without CUDA; run it on a machine with one (`pytest tests/test_async_save_gpu.py`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import manifest
from itertrain.artifacts.async_save import WEIGHTS_WRITTEN
from itertrain.artifacts.snapshot import HostBufferPool, copy_tree

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned staging, device copies)")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_host_buffers_are_pinned_and_the_copy_is_taken_at_the_event():
    pool = HostBufferPool()
    state = {"m": torch.randn(1 << 20, device="cuda"), "step": torch.tensor(3.0, device="cuda")}
    tags: dict[int, str] = {}
    copy, nbytes = copy_tree(state, pool, "opt", tags)
    event = torch.cuda.Event()
    event.record()
    state["m"].add_(1.0)  # training moves on after the copy was enqueued: ordered after it on the stream
    event.synchronize()
    assert pool.pin and all(pool.storage(f"opt/{i}", n).is_pinned() for i, n in enumerate((4 << 20, 4)))
    assert nbytes == (4 << 20) + 4 and set(tags.values()) == {"cuda:0"}  # written with the device's location tag
    assert torch.equal(copy["m"], (state["m"] - 1.0).cpu()) and copy["m"].device.type == "cpu"


def _gpu_trainer(tiny_model: Path, train_file: Path, output_dir: Path, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from itertrain.data import PadCollator, build_dataset, read_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=7, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to="none", disable_tqdm=True, bf16=True, seed=42,
                             full_determinism=True, logging_steps=2)
    return cls(model=model, args=args, train_dataset=build_dataset(read_jsonl(str(train_file)), tok, 64),
               data_collator=PadCollator(tok.pad_token_id), processing_class=tok)


def test_a_save_during_bf16_training_is_hfs_checkpoint_byte_for_byte(tmp_path, tiny_model, train_file, monkeypatch):
    from transformers import Trainer

    from itertrain.artifacts.manager import CheckpointConfig, CheckpointManager
    from itertrain.trainer import attach, with_recovery_hooks

    run = tmp_path / "run"  # one output_dir for both runs: training_args.bin records it
    _gpu_trainer(tiny_model, train_file, run, Trainer).train()
    run.rename(tmp_path / "hf")
    # The first write is held after its weights while training goes on updating the weights on the device.
    monkeypatch.setenv("ITERTRAIN_FAULT", f"{WEIGHTS_WRITTEN}=sleep:2#1")
    manager = CheckpointManager(CheckpointConfig(output_dir=run, async_save=True, fsync=False))
    manager.start_iteration(0, {})
    attach(_gpu_trainer(tiny_model, train_file, run, with_recovery_hooks(Trainer)), manager).train()
    run.rename(tmp_path / "async")
    assert manager.saver is not None and manager.saver.pool.pin
    for step in (3, 6, 7):
        hf, ours = tmp_path / "hf" / f"checkpoint-{step}", tmp_path / "async" / f"checkpoint-{step}"
        names = sorted(p.name for p in hf.iterdir())
        assert sorted(manifest(ours)["files"]) == names
        assert {n: _sha(hf / n) for n in names} == {n: _sha(ours / n) for n in names}, step
    # optimizer.pt records the device of the moments, as HF's does: it loads back onto the GPU
    state = torch.load(tmp_path / "async" / "checkpoint-7" / "optimizer.pt", weights_only=True)
    assert next(iter(state["state"].values()))["exp_avg"].device.type == "cuda"
