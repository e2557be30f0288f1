"""IterationTrainer: HF Trainer with three small hooks and nothing else.

1. `_load_from_checkpoint`: skipped when the weights were already loaded from the plan's weights
   source (an iteration model while the training state comes from a checkpoint: scenario 5), so HF
   does not overwrite them with the checkpoint's weights.
2. `_save_checkpoint`: the CheckpointManager frees the target directory first (a stale checkpoint
   of an older iteration with the same step is moved into its iter_K/, never overwritten in place).
3. Fault points inside the save, for the crash harness.
"""

from __future__ import annotations

from transformers import Trainer

from itertrain import faults
from itertrain.checkpointing import CheckpointManager


class IterationTrainer(Trainer):
    def __init__(self, *args, checkpoints: CheckpointManager, weights_preloaded: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._checkpoints = checkpoints
        self._weights_preloaded = weights_preloaded

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._weights_preloaded:
            return  # the weights came from RecoveryPlan.weights_from, loaded once before training
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        self._checkpoints.before_save(self.state.global_step)
        faults.point("checkpoint.save")
        super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        faults.point("checkpoint.optimizer")  # the weights are written, the optimizer is not yet
        super()._save_optimizer_and_scheduler(output_dir)
