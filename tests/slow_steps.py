"""`--strategy slow_steps:SlowSteps` for the process tests: sft whose training steps last at least
$SLOW_STEP_S seconds, so that a test can act between two known steps. The sleep changes no number:
a run with it and one without produce the same bytes."""

from __future__ import annotations

import os
import time

from itertrain.strategies.sft import SFTStrategy


class SlowSteps(SFTStrategy):
    name = "slow_steps"

    def trainer_class(self) -> type:
        from transformers import Trainer

        class SlowTrainer(Trainer):
            def training_step(self, *args, **kwargs):
                time.sleep(float(os.environ.get("SLOW_STEP_S", "0")))
                return super().training_step(*args, **kwargs)

        return SlowTrainer
