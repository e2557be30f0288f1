"""itertrain in the user's environment: offline mode only where itertrain itself needs it.

A user's `itertrain train` must not be put in offline mode (HF_HUB_OFFLINE=1 makes `--push_to_hub`
fail with OfflineModeIsEnabled); `itertrain demo` and `init-model` make their own model and run offline.
Nothing here reaches the network: a probe strategy records the environment and stops the run (exit 2)
before any model is loaded."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import PY, _run, base_env

pytestmark = pytest.mark.slow  # real itertrain processes (no training)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
MATH_VARS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")  # what makes CPU arithmetic machine-independent

PROBE = textwrap.dedent("""
    import json, os
    from itertrain import Strategy
    from itertrain.errors import UsageError

    def record():
        import huggingface_hub.constants as hub
        seen = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
        seen["hub_offline"] = bool(hub.HF_HUB_OFFLINE)
        seen["math"] = {k: os.environ.get(k) for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump(seen, f)

    class EnvProbe(Strategy):
        @classmethod
        def check_arguments(cls, cfg):
            record()
            raise UsageError("probe: environment recorded")

        def train_rows(self, iteration):
            return []

    def score(prompt, completion, answer):  # the demo's strategies are its own: it probes as a reward function
        record()
        raise ValueError("probe: environment recorded")
""")


def _probe(tmp_path, *command: str, hook: tuple[str, ...] = ("--strategy", "probe_mod:EnvProbe")) -> dict:
    """Run `python -m itertrain COMMAND...` with no offline or math variable set; what the probe saw inside."""
    (tmp_path / "probe_mod.py").write_text(PROBE)
    seen = tmp_path / "seen.json"
    env = {k: v for k, v in base_env({"PROBE_OUT": str(seen)}).items() if k not in OFFLINE_VARS + MATH_VARS}
    r = _run([PY, "-m", "itertrain", *command, *hook], env, 300, tmp_path)
    assert r.returncode == 2 and "probe: environment recorded" in r.stderr, r.output
    return json.loads(seen.read_text())


def test_a_users_train_run_is_not_put_in_offline_mode(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the probe stops the run before the model is read
    seen = _probe(tmp_path, "train", "--model_name", str(model), "--output_dir", str(tmp_path / "exp"))
    assert seen == {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "TRANSFORMERS_OFFLINE": None,
                    "hub_offline": False, "math": {"MKL_CBWR": None, "ATEN_CPU_CAPABILITY": None, "OMP_NUM_THREADS": None}}
    assert not (tmp_path / "exp").exists()


def test_the_demo_runs_offline_by_itself(tmp_path):
    seen = _probe(tmp_path, "demo", "--output_dir", str(tmp_path / "demo"), hook=("--reward_fn", "probe_mod:score"))
    assert seen["HF_HUB_OFFLINE"] == "1" and seen["HF_DATASETS_OFFLINE"] == "1" and seen["hub_offline"] is True
    # one thread; the processor's fastest kernels, as for any run (docs/demo.md: what varies between machines,
    # and the settings that make the arithmetic the same on any x86 CPU, at about 5x the time)
    assert seen["math"] == {"MKL_CBWR": None, "ATEN_CPU_CAPABILITY": None, "OMP_NUM_THREADS": "1"}
    assert (tmp_path / "demo" / "tiny-model" / "config.json").exists()


def test_init_model_runs_offline_by_itself(tmp_path, monkeypatch):
    from itertrain import cli

    for k in OFFLINE_VARS:
        monkeypatch.setenv(k, "restored after the test")
        monkeypatch.delenv(k)
    assert cli.main(["init-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").exists()
    assert cli.os.environ.get("HF_HUB_OFFLINE") == "1" and cli.os.environ.get("HF_DATASETS_OFFLINE") == "1"
