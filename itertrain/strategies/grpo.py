"""`--strategy grpo` and `--strategy rloo`: online RL as iterations, on TRL's GRPOTrainer and RLOOTrainer.

What they share (data, rewards, the reference model, exact resume at generation-block boundaries, metrics)
is in `online_rl`; this module holds what is TRL's: its config classes (with TRL's batch rule explained
before TRL's own check) and its trainers, built against the reference model the plan names.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from itertrain import faults
from itertrain.errors import UsageError

MIN_TRL = "1.16"
try:
    import trl
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
except ImportError as e:
    raise UsageError("--strategy grpo and --strategy rloo train with TRL, an optional dependency that is not "
                     "installed: pip install 'itertrain[dpo]'"
                     + (f" (TRL {MIN_TRL} needs Python >= 3.11)" if sys.version_info < (3, 11) else "")) from e

from packaging.version import Version  # noqa: E402 - after the check that names the missing dependency

if Version(trl.__version__) < Version(MIN_TRL):
    raise UsageError(f"--strategy grpo needs trl>={MIN_TRL}, found {trl.__version__}: pip install -U 'itertrain[dpo]'")

from itertrain.strategies.online_rl import OnlineRLStrategy, check_generation_batch  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers report usage unless told not to


class _BatchRuleExplained:
    """In front of a TRL config: TRL's batch rule checked, and explained with the flags that make the batch,
    before TRL's own terser check (`check_generation_batch`)."""

    def __post_init__(self):
        check_generation_batch(self)
        super().__post_init__()


class ItertrainGRPOConfig(_BatchRuleExplained, GRPOConfig):
    """TRL's GRPOConfig, its fields and defaults unchanged; TRL's batch rule is explained with the flags."""


class ItertrainRLOOConfig(_BatchRuleExplained, RLOOConfig):
    """TRL's RLOOConfig, its fields and defaults unchanged; TRL's batch rule is explained with the flags."""


class _ReferenceByPlan:
    """TRL builds its reference model from `model.config._name_or_path`, which after a resume is wherever
    the weights were loaded from. For the length of the constructor it names the plan's reference instead."""

    def __init__(self, *args: Any, itertrain_reference: str | None = None, **kwargs: Any):
        config = getattr(kwargs.get("model"), "config", None)
        old = getattr(config, "_name_or_path", None)
        if config is not None and itertrain_reference:
            config._name_or_path = itertrain_reference
            faults.point("reference.load")  # a kill while TRL loads the reference model
        try:
            super().__init__(*args, **kwargs)
        finally:
            if config is not None:
                config._name_or_path = old
        adapter_off_reference(self.model)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a model card README.md into output_dir at every save: the experiment root is itertrain's."""


def adapter_off_reference(model: Any) -> None:
    """TRL's reference for a PEFT model is a frozen "ref" copy of the adapter as it is when the trainer is
    built: fresh (a no-op) at an iteration's start, but the checkpoint's trained adapter after a resume.
    itertrain's reference (--iteration_model merged, --ref_model start) is the adapter switched off, on
    every path: the copy's lora_B is zeroed, so it adds exactly nothing."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if "ref" in parts and ("lora_B" in parts or "lora_embedding_B" in parts):
                param.zero_()


class ItertrainGRPOTrainer(_ReferenceByPlan, GRPOTrainer):
    """TRL's GRPOTrainer as itertrain runs it (itertrain puts its RecoveryHooks in front)."""


class ItertrainRLOOTrainer(_ReferenceByPlan, RLOOTrainer):
    """TRL's RLOOTrainer as itertrain runs it (itertrain puts its RecoveryHooks in front)."""


class GRPOStrategy(OnlineRLStrategy):
    name = "grpo"
    method = "GRPO"
    training_arguments_class = ItertrainGRPOConfig
    rl_trainer_class = ItertrainGRPOTrainer


class RLOOStrategy(OnlineRLStrategy):
    name = "rloo"
    method = "RLOO"
    training_arguments_class = ItertrainRLOOConfig
    rl_trainer_class = ItertrainRLOOTrainer
