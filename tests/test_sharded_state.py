"""Sharded training state: HF's FSDP SHARDED_STATE_DICT layout (written for real with DCP on gloo by
tests/make_sharded_checkpoint.py under torchrun) and DeepSpeed's global_stepN/ layout (synthetic, with
stand-ins for DeepSpeed's classes): discovered, verified without running pickled code, committed with
every file, restored, and optimizer moments carried into the next iteration."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, base_env, free_port, itertrain, torchrun
from itertrain.artifacts.manifest import commit_directory, verify_checksums
from itertrain.recovery import sharded
from itertrain.recovery.discover import Status, discover
from itertrain.recovery.plan import StateScope
from itertrain.recovery.restore import OptimizerMomentsCallback, optimizer_problems, load_weights
from itertrain.recovery.verify import structural_problems

pytestmark = pytest.mark.slow  # torchrun writes the FSDP layout; end-to-end runs

CKPT = "checkpoint-2"


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model) -> Path:
    """fsdp/checkpoint-2 (HF's FSDP sharded layout), plain/checkpoint-2 (the same state as a plain HF
    checkpoint) and full.pt (the whole weights and moments), from 2 FSDP2 ranks on gloo."""
    out = tmp_path_factory.mktemp("sharded")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "make_sharded_checkpoint.py"), str(tiny_model), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=base_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def copy(made: Path, tmp_path: Path, layout: str = "fsdp") -> Path:
    dest = tmp_path / layout / CKPT
    shutil.copytree(made / layout / CKPT, dest)
    return dest


class Payload:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_fsdp_layout_is_discovered_committed_and_its_damage_found_without_running_pickles(made, tmp_path):
    ckpt = copy(made, tmp_path)
    assert structural_problems(ckpt, "trainer_checkpoint") == []
    (found,) = discover(ckpt.parent).checkpoints  # a directory of another tool's checkpoints
    assert (found.path, found.step, found.status) == (CKPT, 2, Status.UNVERIFIED)

    m = commit_directory(ckpt, kind="trainer_checkpoint", iteration=0, step=2, fsync=False)
    for rel in ("pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/.metadata",
                "optimizer_0/__0_0.distcp", "rng_state_1.pth", "scheduler.pt"):
        assert rel in m.files  # every file, in every subdirectory
    assert verify_checksums(ckpt, m) == []
    shard = ckpt / "optimizer_0" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size - 1000)
    assert verify_checksums(ckpt, m) == [f"optimizer_0/__1_0.distcp has {shard.stat().st_size} bytes, the manifest "
                                         f"says {shard.stat().st_size + 1000}"]
    assert "optimizer_0/__1_0.distcp is truncated" in "; ".join(structural_problems(ckpt, "trainer_checkpoint"))

    (ckpt / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert "pytorch_model_fsdp_0/.metadata is missing (the save never finished" in \
        "; ".join(structural_problems(ckpt, "trainer_checkpoint"))
    marker = tmp_path / "ran"
    with open(ckpt / "pytorch_model_fsdp_0" / ".metadata", "wb") as f:  # a .metadata that would run a command
        pickle.dump(Payload(marker), f)
    assert "pytorch_model_fsdp_0/.metadata was refused" in "; ".join(structural_problems(ckpt, "trainer_checkpoint"))
    assert not marker.exists()


def test_a_dcp_item_that_would_run_code_is_refused_unread(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker, d = tmp_path / "ran", tmp_path / "optimizer_0"
    dcp.save({"optimizer": {"state": {"w": torch.ones(3)}, "param_groups": Payload(marker)}},
             storage_writer=dcp.FileSystemWriter(str(d)), no_dist=True)
    (problem,) = sharded.dcp_problems(d)
    assert "param_groups holds a pickle that would run code (posix.system)" in problem
    assert not marker.exists()


def test_fsdp_weights_restore_and_moments_carry_on_one_process(made, tmp_path, tiny_model):
    ckpt = copy(made, tmp_path)
    full = torch.load(made / "full.pt", weights_only=True)
    model = load_weights(ckpt, str(tiny_model), "float32", False)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in full["weights"].items())

    assert sharded.dcp_optimizer_problems(ckpt / "optimizer_0", model) == []
    wider = torch.nn.Linear(3, 3)
    assert "holds no exp_avg for parameter weight" in sharded.dcp_optimizer_problems(ckpt / "optimizer_0", wider)[0]
    problems, _ = optimizer_problems(ckpt, model, StateScope.FULL, 1, fsdp=False)
    assert "restores only under --fsdp" in problems[0]  # a full restore needs HF's FSDP path

    # FSDP FULL_STATE_DICT (HF's default) writes the whole optimizer state by parameter name instead
    named = tmp_path / "full" / CKPT
    named.mkdir(parents=True)
    torch.save({"state": full["state"], "param_groups": [{"lr": 1e-3, "params": list(full["state"])}]},
               named / "optimizer.bin")
    assert optimizer_problems(named, model, StateScope.OPTIMIZER, 1, fsdp=False) == ([], [])
    for source in (ckpt, named):
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)  # the next iteration's hyperparameters
        OptimizerMomentsCallback(source).on_train_begin(None, None, None, optimizer=optimizer, model=model)
        for name, p in model.named_parameters():
            assert torch.equal(optimizer.state[p]["exp_avg"], full["state"][name]["exp_avg"])
            assert torch.equal(optimizer.state[p]["exp_avg_sq"], full["state"][name]["exp_avg_sq"])
        assert optimizer.param_groups[0]["lr"] == 5e-5


def test_moments_carried_from_an_fsdp_checkpoint_equal_the_plain_layout_end_to_end(made, tmp_path, tiny_model,
                                                                                  train_file):
    """The guide's layout: base_model/ (iteration 0) and an older checkpoint of iteration 0, once in the
    FSDP layout, once plain. iteration 1 carries the checkpoint's moments (2 ranks, DDP): byte-identical."""
    results = {}
    for layout in ("fsdp", "plain"):
        out = tmp_path / layout / "exp"
        shutil.copytree(made / layout / CKPT, out / CKPT)
        old = time.time() - 3600
        os.utime(out / CKPT, (old, old))  # older than base_model/: a checkpoint of iteration 0
        shutil.copytree(tiny_model, out / "base_model")
        r = torchrun("--model_name", str(tiny_model), "--output_dir", str(out), "--train_file", str(train_file),
                     "--num_iterations", "2", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "4",
                     "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none",
                     "--resume_from", "auto", "--resume_from_iteration", "auto")
        assert r.returncode == 0, r.output
        assert f"Training state from: {out}/{CKPT}" in r.stdout and "optimizer moments only" in r.stdout
        results[layout] = (out / "iter_1" / "model.safetensors").read_bytes()
    assert results["fsdp"] == results["plain"]


FAKE_DEEPSPEED = {  # stand-ins with DeepSpeed's module and class names (deepspeed is not installed)
    "deepspeed/__init__.py": "",
    "deepspeed/runtime/__init__.py": "",
    "deepspeed/runtime/fp16/__init__.py": "",
    "deepspeed/runtime/fp16/loss_scaler.py": "class LossScaler:\n    def __init__(self, scale):\n        self.cur_scale = scale\n",
    "deepspeed/runtime/zero/__init__.py": "",
    "deepspeed/runtime/zero/config.py": "import enum\nclass ZeroStageEnum(int, enum.Enum):\n    gradients = 2\n",
    "deepspeed/utils/__init__.py": "",
    "deepspeed/utils/tensor_fragment.py": "from dataclasses import dataclass\n@dataclass\nclass fragment_address:\n"
                                          "    numel: int\n    start: int\n",
    "evil.py": "import os\nclass Payload:\n    def __reduce__(self):\n        return (os.system, ('true',))\n",
}
MAKE_DEEPSPEED = textwrap.dedent("""
    import sys, torch
    from collections import OrderedDict
    from pathlib import Path
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    d, evil = Path(sys.argv[1]), sys.argv[2] == "evil"
    step = d / "global_step2"
    step.mkdir(parents=True)
    (d / "latest").write_text("global_step2")
    torch.save({"module": OrderedDict(w=torch.ones(4)), "param_shapes": [OrderedDict(w=torch.Size([4]))],
                "global_steps": 2, "dp_world_size": 2, "ds_config": {"zero_optimization": {"stage": 2}}},
               step / "mp_rank_00_model_states.pt")
    for r in (0, 1):
        state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                 "param_slice_mappings": [OrderedDict(w=fragment_address(numel=2, start=2 * r))],
                 "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(2)}}}}
        if evil and r == 1:
            import evil as e
            state["extra"] = e.Payload()
        torch.save({"optimizer_state_dict": state}, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
""")


def deepspeed_checkpoint(tmp_path: Path, *, evil: bool = False) -> Path:
    fake = tmp_path / "fake"
    for rel, text in FAKE_DEEPSPEED.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    ckpt = tmp_path / "ds" / CKPT
    subprocess.run([sys.executable, "-c", MAKE_DEEPSPEED, str(ckpt), "evil" if evil else "ok"], check=True,
                   env=base_env({"PYTHONPATH": str(fake)}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({"cpu": torch.random.get_rng_state()}, ckpt / "rng_state_0.pth")
    return ckpt


def test_deepspeed_layout_is_verified_from_pickle_opcodes_and_never_loaded(tmp_path, tiny_model):
    ckpt = deepspeed_checkpoint(tmp_path)  # ZeRO-3-like: the weights only in global_step2/
    assert structural_problems(ckpt, "trainer_checkpoint") == []
    assert sharded.deepspeed_world_size(ckpt) == 2
    m = commit_directory(ckpt, kind="trainer_checkpoint", iteration=0, step=2, fsync=False)
    assert "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt" in m.files and "latest" in m.files
    model = load_weights(Path(tiny_model), str(tiny_model), "float32", False)
    problems, _ = optimizer_problems(ckpt, model, StateScope.FULL, 1, fsdp=False)
    assert problems == [f"{CKPT} was written by 2 DeepSpeed rank(s), this run has 1: DeepSpeed restores only the same "
                        "data-parallel size (convert it to a universal checkpoint to change it)"]
    problems, warnings = optimizer_problems(ckpt, model, StateScope.OPTIMIZER, 2, fsdp=False)
    assert problems == [] and "the optimizer moments are not carried over" in warnings[0]
    with pytest.raises(ValueError, match="only DeepSpeed restores them: resume with --deepspeed"):
        load_weights(ckpt, str(tiny_model), "float32", False)

    evil = deepspeed_checkpoint(tmp_path / "evil", evil=True)
    assert structural_problems(evil, "trainer_checkpoint") == [
        "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt holds a pickle that would run code (posix.system)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs GPUs (NCCL); run on a GPU machine")
def test_fsdp_on_gpus_killed_and_resumed_gives_the_same_iteration_models(tmp_path, tiny_model, train_file):
    """End to end under HF's FSDP (bf16, NCCL, 2 GPUs when there are 2): a run killed inside a checkpoint
    save and resumed with auto/auto against an uninterrupted one. bf16 kernels may not be bitwise
    deterministic: the iteration models must be equal within 1e-2 (max abs difference), byte-identical
    being the expected outcome with --full_determinism."""
    from safetensors.torch import load_file

    nproc = min(2, torch.cuda.device_count())
    fsdp_config = tmp_path / "fsdp.json"  # FSDP2, checkpoints in the sharded layout (pytorch_model_fsdp_0/, optimizer_0/)
    fsdp_config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                       "state_dict_type": "SHARDED_STATE_DICT"}))
    flags = ["--model_name", str(tiny_model), "--train_file", str(train_file), "--num_iterations", "2",
             "--max_steps", "12", "--save_steps", "4", "--per_device_train_batch_size", "4", "--bf16", "true",
             "--fsdp", "full_shard auto_wrap", "--fsdp_config", str(fsdp_config),
             "--full_determinism", "true", "--disable_tqdm", "true", "--report_to", "none"]
    ref, out = tmp_path / "reference", tmp_path / "exp"
    r = torchrun(*flags, "--output_dir", str(ref), nproc=nproc, timeout=1200)
    assert r.returncode == 0, r.output
    r = torchrun(*flags, "--output_dir", str(out), nproc=nproc, fault="checkpoint.commit=kill#2", timeout=1200)
    assert r.returncode != 0
    assert (out / "checkpoint-4" / "optimizer_0" / ".metadata").exists()  # HF wrote the sharded layout
    r = torchrun(*flags, "--output_dir", str(out), "--resume_from", "auto", "--resume_from_iteration", "auto",
                 nproc=nproc, timeout=1200)
    assert r.returncode == 0, r.output
    for k in range(2):
        a, b = load_file(str(ref / f"iter_{k}" / "model.safetensors")), load_file(str(out / f"iter_{k}" / "model.safetensors"))
        assert a.keys() == b.keys()
        assert max(float((a[n].float() - b[n].float()).abs().max()) for n in a) <= 1e-2
    assert itertrain("verify", str(out)).returncode == 0
