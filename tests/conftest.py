"""Shared fixtures: a tiny local model, training data, and helpers that run itertrain as real processes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Small and fast: ~1M-parameter model, a handful of steps, checkpoints every 4 steps.
FAST_FLAGS = [
    "--max_steps", "12", "--save_steps", "4", "--per_device_train_batch_size", "4",
    "--logging_steps", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "none",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITERTRAIN_FAULT", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def itertrain(*args: str, fault: str | None = None, timeout: int = 300, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Result:
    """Run `python -m itertrain ARGS` as a real process (its own process group, like a shell job)."""
    env = base_env({**({"ITERTRAIN_FAULT": fault} if fault else {}), **(env or {})})
    return _run([PY, "-m", "itertrain", *args], env, timeout, cwd)


def torchrun(*args: str, nproc: int = 2, fault: str | None = None, timeout: int = 300,
             env: dict[str, str] | None = None, cwd: Path | None = None, script: Path | None = None) -> Result:
    """Run `torchrun --nproc_per_node=N train_iterative.py ARGS`, as in the guide."""
    env = base_env({**({"ITERTRAIN_FAULT": fault} if fault else {}), **(env or {})})
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script or REPO / "train_iterative.py"), *args]
    return _run(cmd, env, timeout, cwd)


def _run(cmd: list[str], env: dict[str, str], timeout: int, cwd: Path | None) -> Result:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd or REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}\n{err}")
    return Result(proc.returncode, out, err)


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (what 'byte-for-byte unchanged' means)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / "itertrain.manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "tiny"
    r = itertrain("init-model", str(d))
    assert r.returncode == 0, r.output
    return d


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(p, "w") as f:
        for _ in range(96):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return p


@pytest.fixture
def sft_args(tiny_model, train_file):
    """Flags for a small sft experiment in a given output dir."""

    def make(output_dir: Path, *extra: str, iterations: int = 2) -> list[str]:
        return ["--model_name", str(tiny_model), "--output_dir", str(output_dir), "--train_file",
                str(train_file), "--num_iterations", str(iterations), *FAST_FLAGS, *extra]

    return make


@pytest.fixture
def model_dir(tmp_path):
    """A directory that passes the --model_name check (for parsing tests: nothing loads it)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d
