"""scripts/chaos.py --ci --generation_backend vllm: the kill-anywhere guarantee with sampling on vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, base_env
from itertrain.generation.vllm import version as vllm_version

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(vllm_version() is None, reason="vLLM is not installed")]


def test_kills_inside_vllm_generation_the_data_commit_and_training_give_byte_identical_iteration_models(tmp_path):
    """An uninterrupted 2-rank reference on vLLM, then SIGKILLs of torchrun and both ranks inside generation,
    inside the data commit and in training, each followed by an auto/auto relaunch: every iter_K and every
    data/iter_K equals the reference byte for byte, and no relaunch resumed behind committed work."""
    report = tmp_path / "chaos.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--ci", "--generation_backend", "vllm",
                        "--workdir", str(tmp_path / "w"), "--report", str(report)],
                       capture_output=True, text=True, env=base_env(), timeout=3000)
    summary = json.loads(report.read_text())
    assert summary["progress_ok"] and summary["differences"] == [], summary["differences"]
    killed = {launch["kill"] for launch in summary["launches"] if launch["killed"]}
    assert killed == {"generation.batch", "manifest.data.write", "train.step"}, r.stdout[-3000:]
    assert summary["identical_iterations"] == summary["total_iterations"] == 3
    assert summary["identical_data"] == summary["total_data"] == 2
    assert r.returncode == 0
