"""Unit tests of the pure parts of preemption, restarts and multi-node: the flags read before the full
parse, the refusals, the restart rule, the layout helpers for sharded checkpoints, the preemption
record, the one-line messages for a lost peer. (The real-process tests are in test_preemption.py,
test_restarts.py, test_multinode.py and test_sharded_state.py.)"""

from __future__ import annotations

import pytest

from itertrain import launcher, preemption
import torch.distributed as dist

from itertrain.distributed import is_comm_error, lost_contact, short
from itertrain.errors import UsageError
from itertrain.layout import deepspeed_step_dir, fsdp_dirs
from itertrain.parser import early_flags, parse_train_args


@pytest.fixture
def base(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    return ["--model_name", str(model), "--output_dir", str(tmp_path / "out"), "--train_file", str(data)]


def test_the_flags_needed_before_parsing_come_from_the_command_line_over_the_yaml(tmp_path, base):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dist_timeout_s: 42\npreemption: false\nmax_steps: 5\n")
    early = early_flags(["--config", str(cfg), *base, "--dist_timeout_s=7", "--max_steps", "3"])
    assert (early.dist_timeout_s, early.preemption, early.preemption_grace_s, early.dist_io_timeout_s) == \
        (7.0, False, 25.0, 1800.0)
    assert early_flags([*base, "--preemption"]).preemption is True
    with pytest.raises(UsageError, match="--preemption_grace_s 0.0: must be a positive number of seconds"):
        early_flags([*base, "--preemption_grace_s", "0"])
    run = parse_train_args(["--config", str(cfg), *base, "--preemption_grace_s", "9"])
    assert (run.dist.dist_timeout_s, run.dist.preemption, run.dist.preemption_grace_s) == (42.0, False, 9.0)


_HAS_JIT = "enable_jit_checkpoint" in {f.name for f in __import__("dataclasses").fields(
    __import__("transformers").TrainingArguments)}


@pytest.mark.parametrize("flags,text", [
    pytest.param(["--enable_jit_checkpoint", "true"], "--enable_jit_checkpoint: itertrain's own preemption handling "
                 "replaces it", marks=pytest.mark.skipif(not _HAS_JIT, reason="transformers < 5 has no such flag")),
    (["--fsdp", "full_shard"], "--fsdp full_shard: FSDP needs GPUs"),
    (["--deepspeed", "ds.json"], "--deepspeed ds.json: DeepSpeed needs GPUs"),
    (["--ddp_timeout", "100"], "--ddp_timeout 100: itertrain creates the process group itself and does not use it"),
])
def test_hf_jit_checkpoint_and_sharding_on_cpu_are_refused(base, flags, text, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^" + text.replace("(", r"\(").replace(")", r"\)")):
        parse_train_args([*base, *flags])


def test_a_restarted_worker_continues_as_auto_only_after_an_earlier_attempt_of_its_launch():
    env = {"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_MAX_RESTARTS": "5"}
    me = launcher.launcher_id(env)
    assert me == "rdzv:job-7" and launcher.max_restarts(env) == 5
    assert launcher.launch_summary(env) == {"launcher": me, "restart": 2}
    ours = {"launches": [{"launcher": "rdzv:other"}, {"launcher": me, "restart": 0}]}
    assert launcher.continues_earlier_attempt(ours, env)
    assert not launcher.continues_earlier_attempt({"launches": [{"launcher": "rdzv:other"}]}, env)
    assert not launcher.continues_earlier_attempt(ours, {**env, "TORCHELASTIC_RESTART_COUNT": "0"})
    assert not launcher.continues_earlier_attempt({}, env)
    # torchrun's default rendezvous id is "none": the agent process is the launch
    agent = launcher.launcher_id({**env, "TORCHELASTIC_RUN_ID": "none"})
    assert agent is not None and agent.startswith("agent:")
    assert launcher.launcher_id({}) is None and launcher.launch_summary({}) == {}


def test_sharded_layouts_are_found_by_name(tmp_path):
    ckpt = tmp_path / "checkpoint-8"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ckpt / "optimizer_0").mkdir()
    (ckpt / "optimizer.pt").write_bytes(b"")
    assert fsdp_dirs(ckpt) == (ckpt / "pytorch_model_fsdp_0", ckpt / "optimizer_0")
    assert deepspeed_step_dir(ckpt) is None
    (ckpt / "global_step8").mkdir()
    assert deepspeed_step_dir(ckpt) == ckpt / "global_step8"  # the only one
    (ckpt / "global_step4").mkdir()
    assert deepspeed_step_dir(ckpt) is None  # two and no `latest`: which one is not known
    (ckpt / "latest").write_text("global_step4\n")
    assert deepspeed_step_dir(ckpt) == ckpt / "global_step4"
    (ckpt / "latest").write_text("global_step9")
    assert deepspeed_step_dir(ckpt) is None


def test_only_the_checkpoint_saved_at_the_agreed_step_is_marked_as_a_preemption_checkpoint(monkeypatch):
    monkeypatch.setattr(preemption._state, "agreed", (15, 31))
    mark = preemption.checkpoint_extra(31)["preemption"]
    assert (mark["signal"], mark["step"]) == ("SIGTERM", 31)
    assert preemption.checkpoint_extra(30) == {}
    monkeypatch.setattr(preemption._state, "agreed", None)
    assert preemption.checkpoint_extra(31) == {}


def test_a_lost_peer_is_one_line_without_the_library_noise():
    e = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                     "peer [127.0.0.1]:27798. This is typically caused by a remote worker crashing.\nmore")
    # decided by type, never by text: gloo's plain RuntimeError is told apart by asking the peers
    assert not is_comm_error(e) and not is_comm_error(RuntimeError("unexpected EOF while decoding sample 17"))
    assert is_comm_error(dist.DistNetworkError("x")) and is_comm_error(dist.DistStoreError("Timeout"))
    assert short(e) == "Connection closed by peer [127.0.0.1]:27798"
    failure = lost_contact(e, "training iteration 1", 300)
    assert failure.exit_code == 1 and failure.every_node
    assert str(failure).startswith("rank 0 lost contact with another rank while training iteration 1 (a rank or node "
                                   "died, was stopped or did not answer within 300s): Connection closed by peer")


def test_a_failure_crosses_ranks_as_type_name_message_and_exit_code_only():
    from itertrain import errors, failures

    o = failures.outcome_of(errors.UsageError("bad flag\nmore"), rank=1)
    assert (o.type_name, o.message, o.exit_code, o.rank, o.retried) == ("UsageError", "bad flag", 2, 1, False)
    again = o.error(" (on rank 1)")
    assert type(again) is errors.UsageError and str(again) == "bad flag (on rank 1)" and again.exit_code == 2
    # not itertrain's own (an OSError of a library): a peer's failure, retried by torchrun like any failure
    o = failures.outcome_of(OSError(28, "No space left on device"), rank=0)
    assert o.retried and type(o.error()) is errors.PeerFailed and o.error().exit_code == 1
    assert str(o.error()) == "OSError: [Errno 28] No space left on device"
