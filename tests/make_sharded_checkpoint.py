#!/usr/bin/env python
"""Write a trainer checkpoint in HF's FSDP SHARDED_STATE_DICT layout, on CPU with gloo, the way
accelerate writes it on GPUs (HF Trainer itself never builds FSDP on CPU):

    torchrun --nproc_per_node=2 tests/make_sharded_checkpoint.py MODEL_DIR OUT_DIR

OUT_DIR/fsdp/checkpoint-2/    pytorch_model_fsdp_0/ (accelerate's save_fsdp_model: dcp.save({"model": ...}))
                              optimizer_0/          (save_fsdp_optimizer: dcp.save({"optimizer": ...}))
                              scheduler.pt (rank 0), rng_state_{rank}.pth, trainer_state.json (rank 0)
                              -- no model.safetensors, no optimizer.pt (Trainer._save_checkpoint under FSDP)
OUT_DIR/plain/checkpoint-2/   the same state as a plain (DDP) HF checkpoint: model.safetensors, optimizer.pt, ...
OUT_DIR/full.pt               the whole weights and optimizer moments, to compare what a reader gets back

The model (FSDP2 `fully_shard` per decoder layer and at the root) takes 2 AdamW steps first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

SHARDED = StateDictOptions(full_state_dict=False, cpu_offload=False)  # accelerate's SHARDED_STATE_DICT (FSDP2)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
STEPS = 2


def build(model_dir: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir)


def hf_optimizer(model):
    """AdamW with HF Trainer's two parameter groups (weight decay / none), as Trainer.create_optimizer
    builds it; returns it and the parameter names in the order its state_dict numbers them."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = list(model.named_parameters())
    groups = [[(n, p) for n, p in named if n in decay], [(n, p) for n, p in named if n not in decay]]
    optimizer = torch.optim.AdamW([{"params": [p for _, p in g], "weight_decay": 0.0} for g in groups], lr=1e-3)
    return optimizer, [n for g in groups for n, _ in g]


def train(model, optimizer) -> None:
    g = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        ids = torch.randint(3, 20, (4, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trainer_files(ckpt: Path, optimizer, rank: int) -> None:
    """What Trainer._save_checkpoint writes beside the model and optimizer state."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if rank == 0:
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": STEPS, "max_steps": STEPS,
                                                             "log_history": []}))
    torch.save({"python": None, "cpu": torch.random.get_rng_state()}, ckpt / f"rng_state_{rank}.pth")


def main(model_dir: str, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer, _ = hf_optimizer(model)
    train(model, optimizer)

    ckpt = out / "fsdp" / f"checkpoint-{STEPS}"
    for sub, key, state in (("pytorch_model_fsdp_0", "model", get_model_state_dict(model, options=SHARDED)),
                            ("optimizer_0", "optimizer", get_optimizer_state_dict(model, optimizer, options=SHARDED))):
        (ckpt / sub).mkdir(parents=True, exist_ok=True)
        dcp.save({key: state}, storage_writer=dcp.FileSystemWriter(str(ckpt / sub)))
    trainer_files(ckpt, optimizer, rank)

    weights = get_model_state_dict(model, options=FULL)  # collective; rank 0 receives the values
    moments = get_optimizer_state_dict(model, optimizer, options=FULL)
    if rank == 0:
        torch.save({"weights": weights, "state": moments["state"]}, out / "full.pt")
        plain_model = build(model_dir)  # the same state, as a plain HF checkpoint (DDP writes this)
        plain_model.load_state_dict(weights, strict=False)
        plain_optimizer, order = hf_optimizer(plain_model)
        saved = plain_optimizer.state_dict()  # HF's optimizer.pt: state by parameter index
        saved["state"] = {i: moments["state"][name] for i, name in enumerate(order)}
        plain = out / "plain" / f"checkpoint-{STEPS}"
        plain.mkdir(parents=True, exist_ok=True)
        plain_model.save_pretrained(plain)
        torch.save(saved, plain / "optimizer.pt")
        trainer_files(plain, plain_optimizer, 0)
        for r in range(1, dist.get_world_size()):
            torch.save({"python": None, "cpu": torch.random.get_rng_state()}, plain / f"rng_state_{r}.pth")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
