"""The baseline: the same training job written as a plain Hugging Face Trainer script.

What a user without itertrain would run: load the model and tokenizer, tokenize the same JSONL the
same way, `Trainer(...).train(resume_from_checkpoint=True|None)`, then the two things an itertrain
iteration does after training: the loss on the first 128 training rows (itertrain's `evaluate`
stage when there is no --eval_file: `eval_train_loss`) and `save_model` (itertrain's `iter_0`).
No manifests, no fsync, no recovery.

    python benchmarks/hf_train.py --model_name DIR --train_file F.jsonl --output_dir OUT [--resume] [--use_peft] [HF flags]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class JobArguments:
    model_name: str = field(default=None)  # type: ignore[assignment]
    train_file: str = field(default=None)  # type: ignore[assignment]
    max_seq_length: int = 256  # itertrain's default
    resume: bool = False  # resume_from_checkpoint=True (HF finds the newest checkpoint-* in output_dir)
    eval_train_rows: int = 128  # as itertrain's sft strategy without --eval_file (0: no evaluation)
    # LoRA as a plain HF + PEFT user writes it (TRL's get_peft_config; all linear layers, as itertrain's default)
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05


def main() -> int:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        HfArgumentParser,
        Trainer,
        TrainingArguments,
    )

    # The data pipeline is shared with itertrain on purpose: identical token sequences and batches.
    from itertrain.data import PadCollator, build_dataset, read_jsonl

    job, args = HfArgumentParser((JobArguments, TrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(job.model_name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(job.model_name, dtype=torch.float32, local_files_only=True)
    if job.use_peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=job.lora_r, lora_alpha=job.lora_alpha,
                                                 lora_dropout=job.lora_dropout, bias="none",
                                                 target_modules="all-linear"))
    rows = read_jsonl(job.train_file)
    dataset = build_dataset(rows, tokenizer, job.max_seq_length)
    eval_dataset = None
    if job.eval_train_rows:
        eval_dataset = build_dataset(rows[: job.eval_train_rows], tokenizer, job.max_seq_length)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=True if job.resume else None)
    if eval_dataset is not None:
        trainer.evaluate(metric_key_prefix="eval_train")
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)  # the trained model, as itertrain's iter_0 (config, weights, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
